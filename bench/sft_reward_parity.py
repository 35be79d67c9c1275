"""`rlhf sft` and `rlhf reward` against TRL's SFTTrainer and RewardTrainer: the same loss, step time, peak memory.

A script, not a test: TRL lives in its own environment (see bench/README.md).

    .venv-bench/bin/python bench/sft_reward_parity.py [--steps 3] [--only sft|reward] [--tiny]

For each stage (details of the speed and memory parts in bench/_common.py):

1. Parity, fp32, a tiny random Llama, the first batch before any update; the token ids of both sides are
   compared first. Pass: |ours − TRL's| < 1e-4.
   - SFT: 8 built-in demonstrations. Ours is the first step of `rlhf.sft.training` (the loss on the
     response tokens + EOS); TRL's is `SFTTrainer.compute_loss` with prompt-completion data (completion-only
     loss), the prompt given with our chat template already applied and the plain-string completion, to
     which TRL appends EOS as we do.
   - Reward: 8 pairs (a prompt's own answer chosen, the next prompt's answer rejected), scored as whole
     chats. Both sides load one reward-model folder written first (the tiny model with a seeded score head,
     scaled ×10 so that the scores are of order 1 and the loss is not ≈ log 2), so the heads are identical.
     TRL gets our pad token (`reward_pad_id`: not EOS, which pad is by default and which would make the
     classifier pool at the turn-closing EOS) and a max_length no pair reaches (it silently drops longer pairs).
     Ours is the first step of `rlhf.reward.training`; TRL's is `RewardTrainer.compute_loss` (Bradley–Terry).
2. Speed, each side in its precision (`--precision`, by default ours with `bf16: auto` and TRL in bf16 where the CPU
   computes it natively, else fp32), the embedded SmolLM2-135M-Instruct (--tiny: the tiny Llama), the same
   8 examples/pairs every step, TRL's loop and ours alternating step by step in one process.
3. Peak memory: each side alone in its own child process for steps + 1 steps.

Both sides: batch 8, the stage's learning rate, AdamW (TRL: its default fused AdamW), gradient clipping at
1.0, gradient checkpointing off (TRL's default is on; ours does not checkpoint), max_length 1024.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _common as common
import torch

from rlhf import reward, sft
from rlhf.data import encode_conversation, encode_prompt, encode_response, write_jsonl
from rlhf.models import build_tiny_model, load_reward_model, load_tokenizer, reward_pad_id

SFT_LR = 5e-5
REWARD_LR = 2e-5


# ---------------------------------------------------------------- SFT

def sft_rows() -> list[dict]:
    return common.demonstrations(common.BATCH)


def sft_ours(model_dir: Path, tmp: Path, steps: int, bf16: bool | None = None):
    data = write_jsonl(tmp / "demonstrations.jsonl", sft_rows())
    return sft.training(sft.Config(model=str(model_dir), data=str(data), output_dir=str(tmp / "run"),
                                   batch_size=common.BATCH, epochs=float(steps), lr=SFT_LR, warmup_ratio=0.0,
                                   max_length=1024, **common.ours_settings(bf16), device="cpu"))


def sft_trl(model_dir: Path, out: Path, max_steps: int = -1, callbacks=(), bf16: bool | None = None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(model_dir)
    data = Dataset.from_list([{"prompt": common.templated_prompt(tokenizer, r["prompt"]), "completion": r["completion"]}
                              for r in sft_rows()])
    args = common.trl_args(SFTConfig, out, common.trl_bf16(bf16), max_steps, learning_rate=SFT_LR,
                           max_length=1024,
                           completion_only_loss=True)
    return SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
                      train_dataset=data, processing_class=tokenizer, callbacks=list(callbacks))


def sft_same_ids(trainer, model_dir: Path) -> bool:
    tokenizer = load_tokenizer(model_dir)
    ours = []
    for r in sft_rows():
        prompt, response = (encode_prompt(tokenizer, common.messages(r["prompt"])),
                            encode_response(tokenizer, r["completion"]))
        ours.append((prompt + response, [-100] * len(prompt) + response))
    theirs = [(list(row["input_ids"]), list(row["labels"])) for row in trainer.train_dataset]
    return sorted(ours) == sorted(theirs)


def sft_parity(tmp: Path) -> bool:
    tiny = build_tiny_model(tmp / "tiny", seed=0)
    ours, theirs, trainer = common.first_batch_losses(lambda: sft_ours(tiny, tmp / "ours", 1, bf16=False),
                                                      lambda: sft_trl(tiny, tmp / "trl", bf16=False))
    identical = sft_same_ids(trainer, tiny)
    return common.report_parity("SFT", "rlhf.sft.training, step 1", "SFTTrainer.compute_loss, batch 1",
                         "tiny random Llama, 8 demonstrations, completion-only loss", identical, ours, theirs)


# ---------------------------------------------------------------- reward

def reward_rows() -> list[dict]:
    return common.demonstration_pairs(common.BATCH)


def reward_ours(model_dir: Path, tmp: Path, steps: int, bf16: bool | None = None):
    data = write_jsonl(tmp / "pairs.jsonl", reward_rows())
    return reward.training(reward.Config(model=str(model_dir), data=str(data), output_dir=str(tmp / "run"),
                                         eval_fraction=0.0, batch_size=common.BATCH, epochs=float(steps), lr=REWARD_LR,
                                         warmup_ratio=0.0, max_length=1024, **common.ours_settings(bf16),
                                         device="cpu"))


def reward_trl(model_dir: Path, out: Path, max_steps: int = -1, callbacks=(), bf16: bool | None = None):
    """RewardTrainer on the conversational form (TRL applies the chat template, as `encode_conversation` does)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(model_dir)
    data = Dataset.from_list([{"prompt": common.messages(r["prompt"]),
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in reward_rows()])
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(reward_pad_id(tokenizer))  # TRL pads and pools with it
    args = common.trl_args(RewardConfig, out, common.trl_bf16(bf16), max_steps, learning_rate=REWARD_LR,
                           max_length=1024)
    hf_logging.set_verbosity_error()  # a causal-LM folder: "score.weight newly initialised" is expected
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    return RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=list(callbacks))


def reward_same_ids(trainer, model_dir: Path) -> bool:
    tokenizer = load_tokenizer(model_dir)
    ours = [(encode_conversation(tokenizer, common.messages(r["prompt"]), r["chosen"]),
             encode_conversation(tokenizer, common.messages(r["prompt"]), r["rejected"])) for r in reward_rows()]
    theirs = [(list(row["chosen_ids"]), list(row["rejected_ids"])) for row in trainer.train_dataset]
    pad_ok = trainer.model.config.pad_token_id == reward_pad_id(tokenizer) != tokenizer.eos_token_id
    return sorted(ours) == sorted(theirs) and pad_ok  # same length too: TRL dropped no pair


def reward_folder(source: Path, out: Path) -> Path:
    """A reward model both sides load: `source` with a seeded score head scaled ×10, saved with its tokenizer."""
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = load_reward_model(source, torch.device("cpu"), tokenizer)
    with torch.no_grad():
        model.score.weight.mul_(10)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reward_parity(tmp: Path) -> bool:
    folder = reward_folder(build_tiny_model(tmp / "tiny", seed=0), tmp / "tiny_reward")
    ours, theirs, trainer = common.first_batch_losses(lambda: reward_ours(folder, tmp / "ours", 1, bf16=False),
                                                      lambda: reward_trl(folder, tmp / "trl", bf16=False))
    identical = reward_same_ids(trainer, folder)
    return common.report_parity("reward", "rlhf.reward.training, step 1", "RewardTrainer.compute_loss, batch 1",
                         "tiny random Llama + one seeded score head, 8 pairs, Bradley–Terry", identical, ours, theirs)


STAGES = [
    common.Stage("sft", sft_parity, sft_ours, sft_trl, sft_same_ids),
    common.Stage("reward", reward_parity, reward_ours, reward_trl, reward_same_ids),
]

if __name__ == "__main__":
    sys.exit(common.run(__doc__.splitlines()[0], STAGES))
