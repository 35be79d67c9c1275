"""Run a benchmark at a capped instruction-set level, and say in every result what machine it ran on.

`--isa LEVEL` (default native) re-executes the script with oneDNN's and ATen's caps set before torch is imported:

    native             no cap: what this CPU has
    AVX512_CORE_BF16   AVX-512 with BF16 instructions, no AMX (AMD Zen 4/5, Intel Cooper Lake)
    AVX512_CORE        AVX-512 without BF16 (Intel Skylake-SP to Ice Lake): bf16 emulated
    AVX2               AVX2 only (most laptops): oneDNN has no bf16 at all

The caps only lower what a CPU has, so every level at or below the machine's own runs on any x86 machine; a level
above it (AMX on an AMD CPU) is the machine's own level, and `machine()` says which level was really in use.
"""

from __future__ import annotations

import os
import platform
import sys

# oneDNN's cap, ATen's cap, and MKL's (torch's fp32 BLAS dispatches on its own unless told)
LEVELS = {
    "native": {},
    "AVX512_CORE_BF16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512",
                         "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "AVX512_CORE": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def requested_level(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--isa="):
            return arg.split("=", 1)[1]
    return "native"


def reexec() -> str:
    """Call before `import torch`: re-run this process with the caps of `--isa` when the environment lacks them.
    → the level in force."""
    level = requested_level(sys.argv)
    if level not in LEVELS:
        sys.exit(f"--isa: unknown level '{level}'; choose from {', '.join(LEVELS)}")
    if platform.machine().lower() not in ("x86_64", "amd64") and level != "native":
        sys.exit(f"--isa {level}: the caps exist on x86 only")
    wanted = LEVELS[level]
    current = {key: os.environ.get(key) for key in CAPS}
    if all(current[key] == wanted.get(key) for key in CAPS):
        return level
    env = {k: v for k, v in os.environ.items() if k not in CAPS} | wanted
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return level  # not reached


def machine() -> dict:
    """The CPU, the levels torch and oneDNN use, the thread count and the versions: written into every result."""
    import torch

    from rlhf.hardware import cpu_info

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "trl", "peft", "accelerate"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return {"isa_requested": requested_level(sys.argv), **cpu_info().as_dict(),
            "torch_threads": torch.get_num_threads(), "versions": versions}


def describe(info: dict) -> str:
    return (f"{info['model']}; oneDNN ISA {info['onednn_isa']}{' (capped)' if info['onednn_cap'] else ''}, ATen "
            f"{info['aten_capability']}, native bf16 {info['native_bf16']}, AMX {info['amx']}; {info['torch_threads']} "
            f"threads; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
