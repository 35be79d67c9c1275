"""`rlhf grpo` against TRL 1.16's GRPOTrainer, side by side in one process.

A script, not a test: TRL 1.16 lives in its own environment (`make .venv-trl116/.installed`, see bench/README.md).

    .venv-trl116/bin/python bench/grpo_vs_trl.py                   # SmolLM2-135M: loss check, 5 timed steps, memory
    .venv-trl116/bin/python bench/grpo_vs_trl.py --tiny --steps 2  # smoke test of every part on a tiny random model

The setting, the same on both sides: the embedded SmolLM2-135M-Instruct as policy and (a second copy) reference;
prompts from the built-in arithmetic task (builtin:arithmetic_train), given to TRL with our chat template applied;
the reward `bench/_arithmetic_rewards.py:reward` (the checker plus a small brevity bonus), no reward model; groups
of 4 answers to 2 prompts per step (8 answers), 48 new tokens (exactly, by default: see 2.) at temperature 0.7
(top-p 1, top-k off); GRPO's advantages (group mean and unbiased std, + 1e-4); the clipped surrogate (ε = 0.2) with
the k3 KL to the reference as a loss term, β = 0.04, aggregated as the token mean over the batch (TRL
`loss_type="dapo"`, ours `loss_aggregation: token`); one update per batch (TRL `num_iterations=1`, ours
`ppo_epochs: 1` with one mini-batch); AdamW at TRL's default learning rate 1e-6, linear decay, gradient clipping at
1.0; no missing-EOS penalty (TRL has none).

1. First-batch loss check, fp32, on the speed part's model. Ours runs its first step (`rlhf.ppo.training` with
   `rlhf.grpo.Config`); the bench keeps that step's batch (prompt and completion ids, masks, rewards). TRL's
   `_compute_loss` (`loss_type="dapo"`: Σ over the batch's completion tokens / their number, which with one process
   and one step per generation is also what "bnpo" computes) then runs on exactly those ids, with the advantages
   computed from the same rewards by TRL's formula and its reference log-probabilities from its own reference
   model; the model has not been updated, so both losses are the loss before the first update. Also compared: the
   per-token log-probabilities of the completions (ours `rlhf.ppo.response_logprobs_values`, TRL's
   `_get_per_token_logps_and_entropies`, which differ in position ids on left-padded rows: with rotary embeddings
   only relative positions matter) and our GRPO advantages against TRL's formula. Pass: |ours − TRL's| < 1e-4.
2. Speed, each side in its precision (`--precision`: by default ours with `bf16: auto` and TRL in bf16 where the
   CPU computes it natively, else fp32). TRL's `train()` runs with a callback that, after each TRL step (its
   generation, scoring, reference pass and update), runs one step of ours (`next()` on the generator `rlhf grpo`
   itself runs), so the two alternate; the first step of each is warm-up (ours includes loading its models).
   The prompts differ between the sides (each shuffles its own way). So that a step is the same work on both sides,
   every answer is `RESPONSE_TOKENS` long by default (`--lengths forced`: EOS held back until then, TRL through
   `generation_kwargs={"min_new_tokens": ...}`, ours through `rollout.sample`'s `min_new_tokens`); `--lengths free`
   lets each side stop at EOS, and each step's answer tokens are reported either way.
3. Peak memory: each side alone in its own child process for steps + 1 steps, peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common  # sets up the path and the --isa caps before torch is imported
import _isa
import torch

from rlhf import grpo, losses, ppo
from rlhf.data import encode_prompt, write_jsonl
from rlhf.hardware import keep_freed_memory
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.rollout import sample
from rlhf.verifiable import problems

GROUP = 4  # answers per prompt
BATCH = 8  # answers per step: 2 prompts x 4
RESPONSE_TOKENS = 48
TEMPERATURE = 0.7
BETA = 0.04
CLIP = 0.2
LR = 1e-6  # TRL GRPOConfig's default learning rate
REWARD = str(Path(__file__).resolve().parent / "_arithmetic_rewards.py") + ":reward"
TOLERANCE = 1e-4
TARGET = 2.0  # wanted: TRL's s/step / ours ≥ this, with ours' peak memory lower


def prompt_rows(count: int) -> list[dict]:
    return problems("train")[:count]


def force_lengths(forced: bool) -> None:
    """Every answer of ours `RESPONSE_TOKENS` long (EOS held back), or back to stopping at EOS. The stage has no such
    setting (a real run wants answers to end), so the bench wraps the sampler PPO's loop calls."""
    ppo.sample = functools.partial(sample, min_new_tokens=RESPONSE_TOKENS) if forced else sample


def ours_steps(model_dir: Path, tmp: Path, steps: int, bf16, compile_: bool | None = None):
    """Our GRPO stage as a generator of steps (the one `rlhf grpo` runs), in the shared setting."""
    data = write_jsonl(tmp / "prompts.jsonl", prompt_rows(64))
    config = grpo.Config(policy=str(model_dir), reward_model="", reward_fn=[REWARD], data=str(data),
                         output_dir=str(tmp / "ours"), steps=steps, batch_size=BATCH, mini_batch_size=BATCH,
                         group_size=GROUP, ppo_epochs=1, max_new_tokens=RESPONSE_TOKENS, temperature=TEMPERATURE,
                         lr=LR, beta=BETA, clip=CLIP, kl_in="loss", loss_aggregation="token", missing_eos_penalty=0.0,
                         gold=False, monitor_every=0, sample_every=10_000, generation_batch_size=BATCH, bf16=bf16,
                         **({} if compile_ is None else {"compile": compile_}), device="cpu", seed=0)
    return ppo.training(config)


def trl_trainer(model_dir: Path, out: Path, steps: int, bf16: bool, callbacks=(), forced: bool = False):
    """TRL 1.16's GRPOTrainer in the shared setting, the prompts as text with our chat template applied (TRL then
    tokenises them as they are), the same reward function."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _arithmetic_rewards import reward

    tokenizer = load_tokenizer(model_dir)
    rows = [{"prompt": common.templated_prompt(tokenizer, r["prompt"]), "answer": r["answer"]}
            for r in prompt_rows(64)]
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                      num_generations=GROUP, max_completion_length=RESPONSE_TOKENS, temperature=TEMPERATURE,
                      top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                      max_grad_norm=1.0, beta=BETA, epsilon=CLIP, loss_type="dapo", scale_rewards="group",
                      num_iterations=1, max_steps=steps, bf16=bf16, use_cpu=True, gradient_checkpointing=False,
                      logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                      model_init_kwargs={"dtype": torch.float32},
                      generation_kwargs={"min_new_tokens": RESPONSE_TOKENS} if forced else None)
    return GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer, callbacks=list(callbacks))


def trl_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """TRL 1.16's GRPO advantages (`scale_rewards="group"`): (r − group mean) / (group nanstd + 1e-4)."""
    from trl.trainer.utils import nanstd

    groups = rewards.view(-1, GROUP)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(GROUP)
    std = nanstd(groups, dim=1).repeat_interleave(GROUP)
    return (rewards - mean) / (std + 1e-4)


def loss_check(model_dir: Path, tmp: Path) -> dict:
    """Our first step's loss against TRL's `_compute_loss` on the same completions and rewards, fp32."""
    captured = []
    real = ppo.sample_scored_batch

    def keep_first_batch(*args, **kwargs):
        batch = real(*args, **kwargs)
        captured.append(batch)
        return batch

    ppo.sample_scored_batch = keep_first_batch
    try:
        run = ours_steps(model_dir, tmp / "check", 1, bf16=False, compile_=False)
        row = next(run)
        run.close()
    finally:
        ppo.sample_scored_batch = real
    rollout, _, _, scores, _ = captured[0]
    ours_loss = row["policy_loss"] + BETA * row["kl_loss"]

    trainer = trl_trainer(model_dir, tmp / "check_trl", 1, bf16=False)
    completion_mask = rollout.response_mask.long()
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    width = rollout.response_ids.shape[1]
    with torch.no_grad():
        ref_logprobs = trainer._get_per_token_logps_and_entropies(trainer.ref_model, input_ids, attention_mask,
                                                                   width)[0]
        theirs_logprobs = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask,
                                                                      width)[0]
        advantages = trl_advantages(scores.float())
        inputs = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                  "completion_ids": rollout.response_ids, "completion_mask": completion_mask,
                  "advantages": advantages, "ref_per_token_logps": ref_logprobs,
                  "num_items_in_batch": completion_mask.sum()}
        theirs_loss = trainer._compute_loss(trainer.model, inputs).item()
        policy = load_causal_lm(model_dir, torch.device("cpu"), trainable=False)
        ours_logprobs = ppo.response_logprobs_values(policy, None, rollout, TEMPERATURE, False,
                                                     torch.device("cpu"))[0]
    mask = rollout.response_mask
    logprob_diff = (ours_logprobs - theirs_logprobs).abs()[mask].max().item()
    advantage_diff = (losses.grpo_advantages(scores.float(), GROUP) - advantages).abs().max().item()
    diff = abs(ours_loss - theirs_loss)
    ok = diff < TOLERANCE and logprob_diff < TOLERANCE and advantage_diff < TOLERANCE
    print("\n== first-batch loss check: fp32, the same completions and rewards, before any update ==")
    print(f"batch: {rollout.response_ids.shape[0]} answers, {int(mask.sum())} answer tokens, rewards "
          f"{[round(s, 3) for s in scores.tolist()]}")
    print(f"ours (loss_aggregation: token, kl_in: loss): {ours_loss:.7f}")
    print(f"TRL  (loss_type='dapo', beta={BETA}):        {theirs_loss:.7f}")
    print(f"abs diff {diff:.2e}; max |Δ log-prob| {logprob_diff:.2e}; max |Δ advantage| {advantage_diff:.2e}  ->  "
          f"{'PASS' if ok else 'FAIL'} (tolerance {TOLERANCE:g})")
    return {"ours_loss": ours_loss, "trl_loss": theirs_loss, "loss_diff": diff, "logprob_diff": logprob_diff,
            "advantage_diff": advantage_diff, "loss_type": "dapo", "pass": ok}


def speed(model_dir: Path, tmp: Path, steps: int, ours_bf16, trl_bf16: bool, compile_: bool | None,
          forced: bool) -> dict:
    """TRL's loop with one step of ours after each of TRL's; → per-step times and answer tokens, medians."""
    from transformers import TrainerCallback

    force_lengths(forced)
    ours = ours_steps(model_dir, tmp / "speed", steps + 1, ours_bf16, compile_)
    record: dict[str, list[dict]] = {"trl": [], "ours": []}

    class Alternate(TrainerCallback):
        mark = 0.0
        logs: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.logs = logs

        def on_step_end(self, args, state, control, **kwargs):
            trl_seconds = time.perf_counter() - self.mark
            record["trl"].append({"seconds": trl_seconds, "answer_tokens": None})
            began = time.perf_counter()
            row = next(ours)
            record["ours"].append({"seconds": time.perf_counter() - began,
                                   "answer_tokens": row["response_length"] * BATCH, "loss": row["policy_loss"]})
            print(f"  step {len(record['trl'])}: TRL {trl_seconds:.2f} s, ours {record['ours'][-1]['seconds']:.2f} s",
                  flush=True)
            self.mark = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if record["trl"] and self.logs:  # TRL logs a step's completion lengths after its on_step_end
                record["trl"][-1]["answer_tokens"] = self.logs["completions/mean_length"] * BATCH

    trainer = trl_trainer(model_dir, tmp / "speed_trl", steps + 1, trl_bf16, callbacks=[Alternate()], forced=forced)
    tokenizer, first = load_tokenizer(model_dir), prompt_rows(1)[0]["prompt"]
    theirs_ids = [int(i) for i in trainer._tokenize_prompts([common.templated_prompt(tokenizer, first)])[0][0]]
    same_ids = theirs_ids == encode_prompt(tokenizer, common.messages(first))
    print(f"prompt token ids identical on both sides: {same_ids}")
    trainer.train()
    ours.close()
    force_lengths(False)
    result = {}
    for side, rows in record.items():
        timed = rows[1:]  # the first step of each is warm-up
        seconds = statistics.median(r["seconds"] for r in timed)
        tokens = [r["answer_tokens"] for r in timed if r["answer_tokens"] is not None]
        result[side] = {"s_per_step": seconds, "answers_per_s": BATCH / seconds,
                        "answer_tokens_per_step": statistics.mean(tokens) if tokens else None,
                        "seconds": [round(r["seconds"], 2) for r in rows]}
    result["speedup"] = result["trl"]["s_per_step"] / result["ours"]["s_per_step"]
    result["same_prompt_ids"] = same_ids
    return result


def child(side: str, steps: int, tiny: bool, ours_bf16, trl_bf16: bool, compile_: bool | None,
          forced: bool) -> None:
    """One side alone for `steps` steps; prints its peak RSS (the parent reads the last line)."""
    force_lengths(forced)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model_dir = common.speed_model(tmp, tiny)
        if side == "ours":
            keep_freed_memory()  # what every `rlhf` stage command does first: ours as its users run it
            run = ours_steps(model_dir, tmp, steps, ours_bf16, compile_)
            for _ in range(steps):
                next(run)
        else:
            trl_trainer(model_dir, tmp / "trl", steps, trl_bf16, forced=forced).train()
        print(f"PEAK_RSS_MIB {common.peak_rss_mib():.1f}", flush=True)


def memory(args, steps: int) -> dict:
    peaks = {}
    for side in ("ours", "trl"):
        command = [sys.executable, __file__, "--child", side, "--steps", str(steps), "--isa", args.isa,
                   "--precision", args.precision, "--lengths", args.lengths] + (["--tiny"] if args.tiny else []) \
            + (["--compile"] if args.compile else ["--eager"] if args.eager else [])
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_MIB ")]
        if done.returncode != 0 or not lines:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
            raise RuntimeError(f"memory child {side} failed (exit {done.returncode})")
        peaks[side] = float(lines[-1].split()[1])
    return {"ours_mib": peaks["ours"], "trl_mib": peaks["trl"], "memory_ratio": peaks["ours"] / peaks["trl"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each side after one warm-up step")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (smoke test)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="auto: ours with `bf16: auto`, TRL in bf16 where this CPU computes it natively, else "
                             "fp32; bf16 or fp32: both sides so")
    parser.add_argument("--compile", action="store_true", help="ours with `compile: true`")
    parser.add_argument("--eager", action="store_true", help="ours with `compile: false`")
    parser.add_argument("--isa", default="native", choices=list(_isa.LEVELS),
                        help="cap the instruction set torch and oneDNN use (see bench/_isa.py)")
    parser.add_argument("--lengths", default="forced", choices=("forced", "free"),
                        help=f"forced: every answer on both sides {RESPONSE_TOKENS} tokens (the same work per step); "
                             "free: each side stops at EOS")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default="", help="write the results (and the machine) here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    from rlhf.hardware import cpu_info

    compile_ = True if args.compile else False if args.eager else None
    ours_bf16 = {"auto": "auto", "bf16": True, "fp32": False}[args.precision]
    trl_bf16 = cpu_info().native_bf16 if args.precision == "auto" else args.precision == "bf16"
    if args.child:
        child(args.child, args.steps, args.tiny, ours_bf16, trl_bf16, compile_, args.lengths == "forced")
        return 0
    import transformers
    import trl

    machine = _isa.machine()
    print(f"machine: {_isa.describe(machine)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; ours bf16 "
          f"{ours_bf16}, compile {compile_ if compile_ is not None else 'default'}; TRL bf16 {trl_bf16}")
    results = {"machine": machine, "setting": {"group_size": GROUP, "answers_per_step": BATCH,
                                               "max_new_tokens": RESPONSE_TOKENS, "temperature": TEMPERATURE,
                                               "beta": BETA, "lr": LR, "loss_type": "dapo", "tiny": args.tiny,
                                               "lengths": args.lengths},
               "ours_bf16": ours_bf16, "trl_bf16": trl_bf16, "ours_compile": compile_}
    ok = True
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model_dir = common.speed_model(tmp, args.tiny)
        label = "tiny random Llama" if args.tiny else f"SmolLM2-135M-Instruct ({model_dir})"
        if not args.skip_check:
            results["check"] = loss_check(model_dir, tmp)
            ok &= results["check"]["pass"]
        if not args.skip_speed:
            length = "exactly" if args.lengths == "forced" else "up to"
            print(f"\n== speed: {label}, groups of {GROUP}, {BATCH} answers per step, {length} {RESPONSE_TOKENS} new "
                  f"tokens, {torch.get_num_threads()} threads ==")
            results["speed"] = speed(model_dir, tmp, args.steps, ours_bf16, trl_bf16, compile_,
                                     args.lengths == "forced")
        if not args.skip_memory:
            results["memory"] = memory(args, args.steps + 1)
    if "speed" in results:
        s = results["speed"]
        print(f"\nmedian over {args.steps} steps after 1 warm-up:")
        print(f"  {'':5} {'s/step':>8} {'answers/s':>10} {'answer tokens/step':>19}")
        for side in ("trl", "ours"):
            tokens = s[side]["answer_tokens_per_step"]
            print(f"  {side.upper() if side == 'trl' else side:5} {s[side]['s_per_step']:8.2f} "
                  f"{s[side]['answers_per_s']:10.2f} {tokens if tokens is None else round(tokens, 1)!s:>19}")
        print(f"  throughput ours/TRL = {s['speedup']:.2f}x  ->  {'meets' if s['speedup'] >= TARGET else 'BELOW'} "
              f"the {TARGET}x target")
    if "memory" in results:
        m = results["memory"]
        print(f"peak RSS alone: ours {m['ours_mib']:.0f} MiB, TRL {m['trl_mib']:.0f} MiB, ours/TRL "
              f"{m['memory_ratio']:.2f}  ->  {'lower' if m['memory_ratio'] < 1 else 'NOT lower'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
