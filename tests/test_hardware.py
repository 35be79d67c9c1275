"""The precision choice per CPU (capabilities in, precision out), and the whole tiny pipeline on a CPU capped to
AVX2, where oneDNN has no bf16 at all: `bf16: auto` picks fp32 and says so, `bf16: true` runs (emulated) with a
warning. The caps only lower the instruction set, so these run on any x86 machine."""

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf import config as cfg
from rlhf import sft
from rlhf.hardware import CpuInfo, choose_bf16, cpu_info

SAPPHIRE_RAPIDS = CpuInfo(model="Intel(R) Xeon(R) Platinum 8480+", machine="x86_64", aten_capability="AVX512",
                          onednn_isa="AVX10_1_512_AMX", onednn_cap="", amx=True, avx512_bf16=True, arm_bf16=False,
                          onednn_bf16=True, threads=2, compiler="/usr/bin/g++")
EPYC_ZEN4 = dataclasses.replace(SAPPHIRE_RAPIDS, model="AMD EPYC", onednn_isa="AVX512_CORE_BF16", amx=False)
SKYLAKE = dataclasses.replace(EPYC_ZEN4, model="Intel Xeon Skylake", onednn_isa="AVX512_CORE", avx512_bf16=False)
LAPTOP_AVX2 = dataclasses.replace(SKYLAKE, model="Intel Core i7-8550U", aten_capability="AVX2", onednn_isa="AVX2",
                                  onednn_bf16=False)
CAPPED_ZEN4 = dataclasses.replace(EPYC_ZEN4, onednn_isa="AVX512_CORE", onednn_cap="AVX512_CORE")
GRAVITON3 = dataclasses.replace(LAPTOP_AVX2, model="Neoverse-V1", machine="aarch64", onednn_isa="",
                                aten_capability="SVE256", arm_bf16=True, onednn_bf16=True)


@pytest.mark.parametrize("cpu, auto", [(SAPPHIRE_RAPIDS, True), (EPYC_ZEN4, True), (GRAVITON3, True),
                                       (SKYLAKE, False), (LAPTOP_AVX2, False), (CAPPED_ZEN4, False)])
def test_bf16_auto_is_on_exactly_where_the_cpu_computes_bf16_natively(cpu, auto):
    use, why = choose_bf16("auto", "cpu", cpu)
    assert use is auto
    assert cpu.model in why and ("natively" in why if auto else why.startswith("fp32"))
    assert choose_bf16(False, "cpu", cpu) == (False, "bf16: false (fp32)")
    forced, warning = choose_bf16(True, "cpu", cpu)
    # asked for: on, with a warning where emulated
    assert forced is True and warning.startswith("WARNING") is (not auto)


def test_bf16_auto_on_a_gpu_follows_its_bf16_support():
    assert choose_bf16("auto", "cuda", cuda_bf16=True)[0] is True
    assert choose_bf16("auto", "cuda", cuda_bf16=False)[0] is False
    assert choose_bf16(True, "cuda", cuda_bf16=False)[0] is True


def test_bf16_accepts_auto_true_false_and_names_the_key_otherwise():
    assert cfg.build(sft.Config, {}).bf16 == "auto"
    assert cfg.build(sft.Config, {"bf16": "auto"}).bf16 == "auto"
    assert cfg.build(sft.Config, {"bf16": False}).bf16 is False
    with pytest.raises(cfg.ConfigError, match=r"'bf16': expected true or false or auto, got 'fast'"):
        cfg.build(sft.Config, {"bf16": "fast"})


CAP_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                              reason="the oneDNN ISA caps exist on x86 only")


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent)


@x86_only
def test_the_cap_lowers_what_onednn_may_use():
    here = cpu_info()
    out = run_python("import json; from rlhf.hardware import cpu_info; print(json.dumps(cpu_info().as_dict()))",
                     CAP_AVX2)
    capped = json.loads(out.stdout.strip().splitlines()[-1])
    assert capped["onednn_isa"] == "AVX2" and capped["aten_capability"] == "AVX2"
    assert capped["native_bf16"] is False and capped["onednn_bf16"] is False
    assert capped["avx512_bf16"] == here.avx512_bf16  # the CPU's own flags ignore the cap


@pytest.mark.slow
@x86_only
@pytest.mark.parametrize("bf16, says", [("auto", "[precision] fp32: this CPU has no native bf16"),
                                        ("true", "[precision] WARNING: bf16 autocast as asked (bf16: true)")])
def test_tiny_pipeline_with_sampling_runs_on_an_avx2_cpu(tiny_model, tmp_path, bf16, says):
    """Before `bf16: auto`, the sampler packed bf16 weights with oneDNN whatever the CPU, and under this cap `pairs`
    ended in 'mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw ...'."""
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""output_dir: {tmp_path / 'run'}
model: {tiny_model}
bf16: {bf16}
method: both
sft: {{epochs: 0.1, batch_size: 8, lr: 1.0e-3}}
pairs: {{max_prompts: 8, max_new_tokens: 6}}
reward: {{batch_size: 4, lr: 1.0e-3}}
ppo: {{steps: 1, batch_size: 4, mini_batch_size: 4, max_new_tokens: 6, monitor_every: 0}}
dpo: {{batch_size: 4, lr: 1.0e-3}}
eval: {{max_prompts: 4, max_new_tokens: 6, harmful_prompts: none}}
""")
    done = run_python(f"import sys; from rlhf.cli import main; sys.exit(main(['pipeline', '--config', '{config}']))",
                      {**CAP_AVX2, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert says in done.stdout
    assert done.stdout.count("[precision]") == 1  # said once per run, not once per stage
    assert done.stdout.count("[memory]") == 1
    for stage in ("sft", "reward", "ppo", "dpo"):
        assert (tmp_path / "run" / stage / "config.json").is_file()


RSS_AFTER_A_FREE = """
import re, torch
from rlhf.hardware import keep_freed_memory
said = keep_freed_memory()
rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
block = torch.ones(64 * 2**20)  # 256 MiB, written
held = rss()
del block
print(said)
print(held - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/status")
def test_freed_memory_stays_with_the_process_unless_told_otherwise():
    """`keep_freed_memory` (called by every `rlhf` stage command): on glibc a freed 256 MiB block stays resident,
    ready for the next pass; with RLHF_ALLOCATOR=system, or any MALLOC_* setting of the user's, glibc's default gives
    it back at once."""
    glibc = platform.libc_ver()[0] == "glibc"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "RLHF_ALLOCATOR"}
    kept = subprocess.run([sys.executable, "-c", RSS_AFTER_A_FREE], env=clean, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent)
    said, returned = kept.stdout.strip().splitlines()[-2:]
    assert ("glibc keeps freed memory" in said) == glibc, kept.stdout
    if glibc:
        assert int(returned) < 16, kept.stdout  # MiB given back to the system: none of the block
    for env, reason in (({"RLHF_ALLOCATOR": "system"}, "RLHF_ALLOCATOR=system"),
                        ({"MALLOC_ARENA_MAX": "4"}, "your MALLOC_* settings")):
        default = run_python(RSS_AFTER_A_FREE, env)
        said, returned = default.stdout.strip().splitlines()[-2:]
        assert reason in said, default.stdout
        if glibc:
            assert int(returned) > 200, default.stdout


def test_models_load_without_hub_kernels(tiny_model):
    """transformers turns hub kernels on by default (they replace layers on the first train() on a GPU, downloading
    code, which fails offline); every model the stages load keeps them off."""
    from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer

    cpu = torch.device("cpu")  # (transformers 5.25's own from_pretrained gives use_kernels True here)
    assert not load_causal_lm(tiny_model, cpu).use_kernels
    assert not load_causal_lm(tiny_model, cpu, trainable=False).use_kernels
    assert not load_reward_model(tiny_model, cpu, load_tokenizer(tiny_model)).use_kernels
