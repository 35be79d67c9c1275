"""`rlhf dpo` against TRL's DPOTrainer: the same loss on the same batch, step time and peak memory.

A script, not a test: TRL lives in its own environment (see bench/README.md).

    .venv-bench/bin/python bench/dpo_parity.py [--steps 3] [--tiny] [--skip-speed] [--skip-memory]

1. Parity, fp32 on both sides: a tiny random Llama as the policy and another (other seed) as the
   reference, so that h ≠ 0 and the loss is not log 2 by construction; the same tokenizer and 8 pairs
   from the built-in demonstrations. Ours is the first step of `rlhf.dpo.training` (its loss is computed
   before the first update); TRL's is `DPOTrainer.compute_loss` on its first collated batch. Both
   tokenisations are compared id by id first. Pass: |difference| < 1e-4.
2. Speed, each side in its precision (`--precision`: by default ours with `bf16: auto`, TRL in bf16 where the CPU
   computes it natively, else fp32): the embedded SmolLM2-135M-Instruct (--tiny: a tiny Llama) as policy
   and a second copy as reference, the same 8 pairs (16 sequences) every step, the reference computed every
   step on both sides. TRL runs its own training loop; a callback times each TRL step (on_step_begin →
   on_step_end: forward, backward, clip, optimiser, scheduler) and then times one step of ours, `next()` on
   `rlhf.dpo.training` (reference log-probs, one policy forward over chosen + rejected, loss, backward,
   clip, AdamW, logging), so the two alternate. TRL's gradient checkpointing (on by default in TRL) is
   turned off, as ours does not checkpoint; everything else (its fused AdamW, its chunked LM-head
   log-probs) is TRL's default. Reported: s/step and real tokens/s, medians over the steps after the first.
3. Peak memory: each side alone in its own child process for steps + 1 steps (bench/_common.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import _common as common
import torch

from rlhf import dpo
from rlhf.data import encode_prompt, encode_response, write_jsonl
from rlhf.models import build_tiny_model, load_tokenizer

BETA = 0.1
LR = 5e-6


def rows() -> list[dict]:
    return common.demonstration_pairs(common.BATCH)


def dpo_ours(model_dir: Path, tmp: Path, steps: int, bf16: bool | None = None,
             reference: Path | None = None):
    """`rlhf.dpo.training` on the 8 pairs; the reference is a second copy of the model unless given."""
    data = write_jsonl(tmp / "pairs.jsonl", rows())
    return dpo.training(dpo.Config(model=str(model_dir), reference=str(reference or ""), data=str(data),
                                   output_dir=str(tmp / "run"), batch_size=common.BATCH, eval_fraction=0.0,
                                   epochs=float(steps), beta=BETA, lr=LR, warmup_ratio=0.0, max_length=1024,
                                   **common.ours_settings(bf16), device="cpu"))


def dpo_trl(model_dir: Path, out: Path, max_steps: int = -1, callbacks=(), bf16: bool | None = None,
            reference: Path | None = None):
    """DPOTrainer on the plain-string form with the chat template already applied to the prompt.

    TRL appends EOS to plain-string answers, as `rlhf sft`/`rlhf dpo` do; with message lists it would
    also keep the template's newline after EOS, which we do not train on. The reference is passed
    explicitly (with `ref_model=None` and an in-memory model TRL tries the hub).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(model_dir)
    data = Dataset.from_list([{"prompt": common.templated_prompt(tokenizer, r["prompt"]), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in rows()])
    args = common.trl_args(DPOConfig, out, common.trl_bf16(bf16), max_steps, learning_rate=LR, beta=BETA,
                           loss_type=["sigmoid"], max_length=1024)
    return DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                      ref_model=AutoModelForCausalLM.from_pretrained(reference or model_dir, dtype=torch.float32),
                      args=args, train_dataset=data, processing_class=tokenizer, callbacks=list(callbacks))


def dpo_same_ids(trainer, model_dir: Path) -> bool:
    tokenizer = load_tokenizer(model_dir)
    ours = [(encode_prompt(tokenizer, common.messages(r["prompt"])), encode_response(tokenizer, r["chosen"]),
             encode_response(tokenizer, r["rejected"])) for r in rows()]
    theirs = [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in trainer.train_dataset]
    return sorted(ours) == sorted(theirs)


def dpo_parity(tmp: Path) -> bool:
    policy = build_tiny_model(tmp / "tiny_policy", seed=0)
    reference = build_tiny_model(tmp / "tiny_reference", seed=1)
    ours, theirs, trainer = common.first_batch_losses(
        lambda: dpo_ours(policy, tmp / "ours", 1, bf16=False, reference=reference),
        lambda: dpo_trl(policy, tmp / "trl", bf16=False, reference=reference))
    identical = dpo_same_ids(trainer, policy)
    return common.report_parity("DPO", "rlhf.dpo.training, step 1", "DPOTrainer.compute_loss, batch 1",
                                "tiny random Llama (policy seed 0, reference seed 1), 8 pairs", identical, ours, theirs)


STAGES = [common.Stage("dpo", dpo_parity, dpo_ours, dpo_trl, dpo_same_ids)]

if __name__ == "__main__":
    sys.exit(common.run(__doc__.splitlines()[0], STAGES))
