"""What the memory allocator costs a training pass: the embedded model's forward and backward, timed, with the peak
resident memory. Run it once per allocator setting (the settings are environment variables, read at process start):

    .venv/bin/python bench/allocator.py --isa AVX2
    MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=536870912 MALLOC_MMAP_MAX_=0 \
        .venv/bin/python bench/allocator.py --isa AVX2

The pass is PPO's and SFT's shape: SmolLM2-135M-Instruct on 8 sequences of 100 tokens, logits at every position, a
backward pass from their log-sum-exp, in the precision `bf16: auto` picks at the level. glibc's default gives every
freed block of more than its (moving) mmap threshold back to the system, and trims the top of its heap, so the next
pass's activations and casts fault their pages in again; the second line keeps all of them in the heap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _isa  # noqa: E402

ISA = _isa.reexec()  # --isa LEVEL: the caps must be in the environment before torch is imported

import torch  # noqa: E402
from _common import peak_rss_mib  # noqa: E402

from rlhf import fast  # noqa: E402
from rlhf.hardware import autocast, resolve_bf16  # noqa: E402
from rlhf.models import resolve_model_path  # noqa: E402

SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_ARENA_MAX")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", default="native", help="cap oneDNN and ATen to this level (bench/_isa.py)")
    parser.add_argument("--steps", type=int, default=8, help="passes; the first two are warm-up")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    device = torch.device("cpu")
    bf16 = resolve_bf16("auto", device)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("default"), dtype=torch.float32)
    input_ids = torch.randint(0, model.config.vocab_size, (8, 100))
    mask = torch.ones_like(input_ids)
    seconds = []
    for _ in range(args.steps):
        began = time.perf_counter()
        with autocast(device, bf16), fast.attention_for_width(device, input_ids.shape[1], bf16):
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        logits.float().logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - began)
    result = {"machine": _isa.machine(), "bf16": bf16,
              "allocator": {key: os.environ[key] for key in SETTINGS if key in os.environ} or "glibc default",
              "seconds": seconds, "median_after_warmup_s": statistics.median(seconds[2:]),
              "peak_rss_mib": peak_rss_mib()}
    print(f"{_isa.describe(result['machine'])}; bf16 {bf16}; allocator {result['allocator']}")
    print(f"forward + backward: median {result['median_after_warmup_s']:.2f} s after 2 warm-up passes "
          f"({', '.join(f'{s:.2f}' for s in seconds)}); peak RSS {result['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
