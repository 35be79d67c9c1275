"""The device a run computes on, what its CPU computes natively, and the precision that follows.

Why: bf16 autocast is a large speed-up only where the matrix units compute bf16 natively: Intel AMX, AVX-512
BF16 (Intel Cooper Lake and later, AMD Zen 4 and later), or Arm's BF16 extension. Elsewhere (most laptops:
AVX2 only) torch emulates bf16 matmuls and they run several times slower than fp32, and oneDNN refuses to
pack bf16 weights at all. So `bf16: auto`, the default, turns bf16 on only where it is native, and says why.

What oneDNN may use is the CPU's instruction set capped by `ONEDNN_MAX_CPU_ISA` (or `DNNL_MAX_CPU_ISA`), and
what ATen's own kernels use is capped by `ATEN_CPU_CAPABILITY`; the caps only lower, so setting them on any x86
machine reproduces an older CPU. `torch.cpu._is_*` read the CPU's flags and ignore the caps, so the effective
level is the lower of the two.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from typing import Literal, Union

import torch

from rlhf.tracking import say

# `bf16` in every stage's config: True, False, or "auto" (bf16 only where this device computes it natively)
Precision = Union[bool, Literal["auto"]]

# oneDNN's x86 ISA levels, lowest first, by the names ONEDNN_MAX_CPU_ISA takes (aliases map to one rank)
ONEDNN_LEVELS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                 "AVX512_CORE_BF16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                 "AVX10_2_512_AMX_2")
_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX",
            "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16"}
NATIVE_BF16_LEVEL = "AVX512_CORE_BF16"  # from here up bf16 dot products are instructions, not emulation


def _rank(level: str) -> int:
    level = _ALIASES.get(level.upper(), level.upper())
    return ONEDNN_LEVELS.index(level) if level in ONEDNN_LEVELS else len(ONEDNN_LEVELS)  # ALL / DEFAULT: no cap


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU offers and what torch and oneDNN may use of it in this process."""

    model: str  # the CPU's name, as /proc/cpuinfo gives it
    machine: str  # x86_64, aarch64, ...
    aten_capability: str  # ATen's vector level: DEFAULT, AVX2, AVX512, ... (after ATEN_CPU_CAPABILITY)
    onednn_isa: str  # oneDNN's effective level (the CPU's, lowered by ONEDNN_MAX_CPU_ISA), "" on non-x86
    onednn_cap: str  # the cap set in the environment, "" when none
    amx: bool  # the CPU's flags, caps ignored
    avx512_bf16: bool
    arm_bf16: bool
    onednn_bf16: bool  # oneDNN runs bf16 at all (native or emulated); without it bf16 weights cannot be packed
    threads: int
    compiler: str  # the C++ compiler torch.compile would use on CPU, "" when none is found

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls in hardware: AMX or AVX-512 BF16 within the oneDNN cap, or Arm's BF16 extension."""
        if self.machine in ("aarch64", "arm64"):
            return self.arm_bf16 and self.onednn_bf16
        return bool(self.onednn_isa) and _rank(self.onednn_isa) >= _rank(NATIVE_BF16_LEVEL) and self.onednn_bf16

    def as_dict(self) -> dict:
        return {**asdict(self), "native_bf16": self.native_bf16}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _arm_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {flag for line in f if line.lower().startswith("features") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _onednn_level_of_cpu() -> str:
    """The highest oneDNN level this CPU's flags reach (coarse: the levels that decide precision and packing)."""
    if torch.cpu._is_amx_tile_supported():
        return "AVX10_1_512_AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512_CORE_BF16"
    if torch.cpu._is_avx512_supported():
        return "AVX512_CORE_VNNI" if torch.cpu._is_vnni_supported() else "AVX512_CORE"
    if torch.cpu._is_avx2_supported():
        return "AVX2"
    return "SSE41"


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_info() -> CpuInfo:
    machine = platform.machine().lower()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    isa = ""
    if machine in ("x86_64", "amd64", "i686", "x86"):
        isa = _onednn_level_of_cpu()
        if cap and _rank(cap) < _rank(isa):
            isa = _ALIASES.get(cap.upper(), cap.upper())
    compiler = os.environ.get("CXX", "")
    compiler = shutil.which(compiler) if compiler else (shutil.which("g++") or shutil.which("c++")
                                                        or shutil.which("clang++") or "")
    return CpuInfo(model=_cpu_model(), machine=machine, aten_capability=torch.backends.cpu.get_cpu_capability(),
                   onednn_isa=isa, onednn_cap=cap, amx=torch.cpu._is_amx_tile_supported(),
                   avx512_bf16=torch.cpu._is_avx512_bf16_supported(), arm_bf16="bf16" in _arm_flags(),
                   onednn_bf16=_onednn_bf16(), threads=torch.get_num_threads(), compiler=compiler or "")


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu; a device that is not there is an error that says so."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"device: '{requested}' is not a device name; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: '{requested}' asked for, but this machine has no CUDA device; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: '{requested}' asked for, but this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: '{requested}' is not supported; use cpu, cuda, cuda:N or auto")
    return device


def choose_bf16(requested: Precision, device_type: str, cpu: CpuInfo | None = None,
                cuda_bf16: bool = False) -> tuple[bool, str]:
    """The precision decision, capabilities in, (bf16 on?, why) out. A pure function: the tests feed it CPUs."""
    if requested is False:
        return False, "bf16: false (fp32)"
    if device_type == "cuda":
        if cuda_bf16:
            return True, "bf16 autocast on the GPU" + (" (bf16: auto)" if requested == "auto" else "")
        if requested == "auto":
            return False, "fp32: this GPU has no native bf16 (bf16: auto)"
        return True, ("bf16 autocast as asked (bf16: true), though this GPU has no native bf16: expect it slower "
                      "than fp32")
    cpu = cpu or cpu_info()
    where = (f"{cpu.model}, oneDNN ISA {cpu.onednn_isa or cpu.machine}"
             + (f" (capped by {cpu.onednn_cap})" if cpu.onednn_cap else ""))
    if cpu.native_bf16:
        unit = "AMX" if cpu.amx and _rank(cpu.onednn_isa) >= _rank("AVX10_1_512_AMX") else (
            "Arm BF16" if cpu.machine in ("aarch64", "arm64") else "AVX-512 BF16")
        return True, f"bf16 autocast: this CPU computes bf16 natively ({unit}; {where})"
    if requested == "auto":
        return False, (f"fp32: this CPU has no native bf16 matmuls (no AMX or AVX-512 BF16 in use; {where}); bf16 "
                       f"would be emulated and several times slower (bf16: auto)")
    return True, (f"WARNING: bf16 autocast as asked (bf16: true), but this CPU has no native bf16 ({where}): bf16 "
                  f"matmuls are emulated, several times slower than fp32; bf16: auto would pick fp32 here")


@functools.cache
def _said(message: str) -> None:
    say(f"[precision] {message}")


def resolve_bf16(requested: Precision, device: torch.device) -> bool:
    """Whether this run uses bf16 autocast; the choice and its reason are printed once per process."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    use, why = choose_bf16(requested, device.type, cpu_info() if device.type == "cpu" else None, cuda_bf16)
    _said(why)
    return use


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CPU and on CUDA; a no-op context when off."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def packs_bf16_weights() -> bool:
    """Whether oneDNN can pack bf16 weights here: it refuses below AVX-512 (AVX2 laptops), even when bf16 is forced."""
    return cpu_info().onednn_bf16


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
ALLOCATOR_ENV = "RLHF_ALLOCATOR"  # "system" leaves the C library's allocator as it is


@functools.cache
def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for the next pass instead of giving it back to the system: no block
    from mmap, the top of the heap never trimmed (below 2 GiB free), 512 MiB of padding each time it grows.

    Why: by default every large block (activations, weights cast to bf16, gradients, logits) is unmapped when freed,
    and the next pass faults its pages in again. That cost 4–25% of a forward and backward pass of the embedded model
    on the CPUs measured (bench/README.md, `bench/allocator.py`). The price is a peak resident memory that can be
    higher, since freed memory stays with the process (lower in the reward model's run, higher in others).
    Left alone: other C libraries (musl, macOS, Windows), any MALLOC_* setting of the user's, and RLHF_ALLOCATOR=system.
    → what was done, also printed once per process."""
    import ctypes

    if os.environ.get(ALLOCATOR_ENV, "").lower() == "system":
        why = f"the C library's default allocator ({ALLOCATOR_ENV}=system)"
    elif any(key.startswith("MALLOC_") for key in os.environ):
        why = "the allocator as your MALLOC_* settings make it"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        why = "the C library's default allocator (not glibc)"
    else:
        mallopt = ctypes.CDLL(None).mallopt
        done = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_TOP_PAD, 512 * 2**20)]
        why = ("glibc keeps freed memory for reuse (no pages given back between passes; "
               f"{ALLOCATOR_ENV}=system to leave it alone)" if all(done) else
               "the C library's default allocator (glibc refused the settings)")
    say(f"[memory] {why}")
    return why
