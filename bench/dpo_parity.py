"""`rlhf dpo` against TRL's DPOTrainer: the same loss on the same batch, and the time of a training step.

A script, not a test: TRL lives in its own environment (see bench/README.md).

    .venv-bench/bin/python bench/dpo_parity.py [--steps 3]

1. Parity, fp32 on both sides: a tiny random Llama as the policy and another (other seed) as the
   reference, so that h ≠ 0 and the loss is not log 2 by construction; the same tokenizer and 8 pairs
   from the built-in demonstrations. Ours is `rlhf.dpo.main`'s first logged loss (computed before the
   first update); TRL's is `DPOTrainer.compute_loss` on its first collated batch. Both tokenisations are
   compared id by id first. Pass: |difference| < 1e-4.
2. Speed, bf16 autocast on both sides: the embedded SmolLM2-135M-Instruct as policy and (a second copy)
   reference, the same 8 pairs (16 sequences) every step. TRL runs its own training loop; a callback
   times each TRL step (on_step_begin → on_step_end: forward, backward, clip, optimiser, scheduler) and
   then runs and times one step of ours, so the two alternate. Ours is the loop body of `rlhf.dpo.main`
   (reference log-probs, one policy forward over chosen + rejected, loss, backward, clip, AdamW).
   TRL's gradient checkpointing (on by default in TRL) is turned off, as ours does not checkpoint;
   everything else (its fused AdamW, its chunked LM-head log-probs) is TRL's default.
   Reported: the median over the steps after the first (warm-up) of each, and ours / TRL's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from rlhf import dpo  # noqa: E402  (needs the repo on sys.path first)
from rlhf.data import builtin_task_dir, encode_prompt, encode_response, write_jsonl  # noqa: E402
from rlhf.models import (build_tiny_model, load_causal_lm, load_tokenizer, optimizer_and_schedule,  # noqa: E402
                         resolve_model_path)

BATCH = 8
BETA = 0.1
LR = 5e-6


def demonstration_pairs(n: int) -> list[dict]:
    """n pairs from the built-in demonstrations: its own answer is chosen, the next prompt's answer rejected."""
    rows = [json.loads(line) for line in (builtin_task_dir() / "demonstrations.jsonl").read_text().splitlines()[:n + 1]]
    return [{"prompt": rows[i]["prompt"], "chosen": rows[i]["completion"], "rejected": rows[i + 1]["completion"]}
            for i in range(n)]


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def our_pairs(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    return [(encode_prompt(tokenizer, messages(r["prompt"])), encode_response(tokenizer, r["chosen"]),
             encode_response(tokenizer, r["rejected"])) for r in rows]


def trl_trainer(policy, reference, tokenizer, rows: list[dict], out: Path, bf16: bool, max_steps: int = -1, callbacks=()):
    """DPOTrainer on the plain-string form with the chat template already applied to the prompt.

    TRL appends EOS to plain-string answers, as `rlhf sft`/`rlhf dpo` do; with message lists it would
    also keep the template's newline after EOS, which we do not train on.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": tokenizer.apply_chat_template(messages(r["prompt"]), add_generation_prompt=True,
                                                                       tokenize=False),
                               "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=LR, beta=BETA,
                     loss_type=["sigmoid"], max_length=1024, bf16=bf16, use_cpu=True, gradient_checkpointing=False,
                     max_steps=max_steps, lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no",
                     report_to="none", seed=0, disable_tqdm=True)
    return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=list(callbacks))


def same_ids(trainer, pairs) -> bool:
    theirs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    return theirs == [tuple(map(list, p)) for p in pairs]


def parity(tmp: Path) -> bool:
    from transformers import AutoModelForCausalLM

    policy_dir = build_tiny_model(tmp / "tiny_policy", seed=0)
    reference_dir = build_tiny_model(tmp / "tiny_reference", seed=1)
    tokenizer = load_tokenizer(policy_dir)
    rows = demonstration_pairs(BATCH)
    data = write_jsonl(tmp / "pairs.jsonl", rows)

    # ours: the stage itself, one step; its first logged loss is the first batch's before any update
    out = tmp / "ours"
    dpo.main(dpo.Config(model=str(policy_dir), reference=str(reference_dir), data=str(data), output_dir=str(out),
                        batch_size=BATCH, eval_fraction=0.0, epochs=1.0, beta=BETA, lr=LR, max_length=1024,
                        bf16=False, device="cpu"))
    ours = json.loads((out.parent / "ours_logs" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    trainer = trl_trainer(AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
                          AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32),
                          tokenizer, rows, tmp / "trl", bf16=False)
    identical = same_ids(trainer, our_pairs(tokenizer, rows))
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
    diff = abs(ours - theirs)
    ok = identical and diff < 1e-4
    print("\n== parity: tiny random Llama (policy seed 0, reference seed 1), 8 pairs, fp32 ==")
    print(f"token ids identical on both sides: {identical}")
    print(f"ours  (rlhf.dpo.main, first step):       {ours:.7f}")
    print(f"TRL   (DPOTrainer.compute_loss, batch 1): {theirs:.7f}")
    print(f"abs diff {diff:.2e}  ->  {'PASS' if ok else 'FAIL'} (tolerance 1e-4)")
    return ok


def speed(tmp: Path, steps: int) -> None:
    from transformers import AutoModelForCausalLM, TrainerCallback

    device = torch.device("cpu")
    model_dir = resolve_model_path("default")
    tokenizer = load_tokenizer(model_dir)
    rows = demonstration_pairs(BATCH)
    pairs = our_pairs(tokenizer, rows)

    # ours: the loop body of rlhf.dpo.main on the same batch every step
    config = dpo.Config(beta=BETA, lr=LR, bf16=True)
    policy = load_causal_lm(model_dir, device)
    reference = load_causal_lm(model_dir, device, trainable=False)
    loss_fn = dpo.pick_loss(config)
    optimizer, schedule = optimizer_and_schedule(policy.parameters(), LR, 0.0, steps + 1, 0)
    pad_id = tokenizer.pad_token_id

    def our_step() -> None:
        ref = dpo.reference_logprobs(reference, policy, pairs, pad_id, device, True, BATCH).T.reshape(-1)
        logprobs, n_tokens = dpo.pair_logprobs(policy, pairs, pad_id, device, True)
        loss, _ = loss_fn(logprobs, n_tokens, ref)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"ours": [], "trl": []}

    class Alternate(TrainerCallback):
        """Times TRL's step, then runs and times one of ours: the two alternate, step by step."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["trl"].append(time.perf_counter() - self.started)
            started = time.perf_counter()
            our_step()
            times["ours"].append(time.perf_counter() - started)
            print(f"  step {len(times['trl'])}: TRL {times['trl'][-1]:.2f} s, ours {times['ours'][-1]:.2f} s", flush=True)

    trainer = trl_trainer(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          tokenizer, rows, tmp / "trl_speed", bf16=True, max_steps=steps + 1, callbacks=[Alternate()])
    identical = same_ids(trainer, pairs)
    shape = tuple(next(iter(trainer.get_train_dataloader()))["input_ids"].shape)
    width = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    print(f"\n== speed: SmolLM2-135M-Instruct ({model_dir}), bf16 autocast, {BATCH} pairs, "
          f"{torch.get_num_threads()} threads ==")
    print(f"token ids identical: {identical}; TRL batch {shape}, ours ({2 * BATCH}, {width})")
    trainer.train()
    ours, theirs = statistics.median(times["ours"][1:]), statistics.median(times["trl"][1:])
    print(f"median s/step over {steps} steps after 1 warm-up: ours {ours:.2f} s, TRL {theirs:.2f} s, "
          f"ours/TRL = {ours / theirs:.2f}  ->  {'not slower' if ours <= theirs else 'SLOWER'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each after one warm-up step")
    parser.add_argument("--skip-speed", action="store_true", help="only the parity check")
    args = parser.parse_args()
    import trl

    print(f"torch {torch.__version__}, trl {trl.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        ok = parity(Path(tmp))
        if not args.skip_speed:
            speed(Path(tmp), args.steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
