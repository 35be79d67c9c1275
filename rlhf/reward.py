"""Stage 2: a reward model trained on pairwise preferences with the Bradley–Terry loss.

What: a sequence classifier with one output, r(prompt, response), trained so that the chosen answer
scores above the rejected one: loss = −log σ(r(chosen) − r(rejected) − margin). It starts from the
SFT model (it already reads the task's language); its score head starts fresh.
Papers: Bradley & Terry 1952; Stiennon et al. 2020; Ouyang et al. 2022 step 2 (margin: Llama 2).
Our deviations: the model scores the whole chat as the template writes it (prompt + answer + end of
turn), so any tool that applies the same template reproduces our scores. After training, the scores
of the pairs' responses (samples of the reference policy) give a mean and std that PPO uses to
normalise rewards to about N(0, 1). In training, a pair's two conversations go through the model as
one row that holds their shared opening (the prompt) once (`pair_scores`): the same scores, fewer tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator

import torch

from rlhf import config as cfg
from rlhf import distributed, fast
from rlhf.checkpoint import TrainingState, trim_metrics
from rlhf.data import (
    LengthPolicy,
    encode_conversation,
    next_batch,
    pad_right,
    read_usable_preferences,
    resolve_data_path,
)
from rlhf.guard import BadSteps
from rlhf.hardware import Precision, autocast, pick_device, resolve_bf16
from rlhf.losses import bradley_terry_loss
from rlhf.models import (
    check_writable,
    gathered_for_saving,
    load_reward_model,
    load_tokenizer,
    optimizer_and_schedule,
    pack_continuations,
    resolve_model_path,
    save_atomic,
    score_sequences,
)
from rlhf.tracking import RunLog, run_to_end, say, seed_everything


@dataclass
class Config:
    model: str = cfg.field("default", "starting model: the SFT folder, any causal-LM folder, or 'default'")
    data: str = cfg.field("runs/pairs/pairs.jsonl", "preference pairs (prompt, chosen, rejected)")
    output_dir: str = cfg.field("runs/reward", "where the reward model is written")
    eval_fraction: float = cfg.field(0.1, "share of pairs held out to measure pairwise accuracy")
    epochs: float = cfg.field(1.0, "passes over the training pairs")
    batch_size: int = cfg.field(8, "pairs per optimiser step (the global batch: split over the processes under "
                                   "torchrun)")
    lr: float = cfg.field(2e-5, "peak learning rate")
    weight_decay: float = cfg.field(0.0, "AdamW weight decay")
    warmup_ratio: float = cfg.field(0.1, "fraction of steps warming the learning rate up")
    margin_field: str = cfg.field("", "a numeric field of each pair used as the BT margin ('' = no margin)")
    max_length: int = cfg.field(256, "longest prompt+response in tokens")
    truncation: str = cfg.field("truncate", "longer pairs: truncate or skip")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    compile: bool = cfg.field(False, "torch.compile each decoder layer for the training and scoring passes (generation "
                                     "stays eager): faster steps after a one-off compile; needs a C++ compiler")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    fsdp: distributed.Sharding = cfg.field("auto", "shard the weights, gradients and optimiser state over the "
                                                   "processes with FSDP2: auto (with more than one process), true "
                                                   "or false (each process a full copy)")
    activation_checkpointing: bool = cfg.field(False, "recompute each decoder layer in the backward pass: less "
                                                      "memory, about one more forward pass of time")
    seed: int = cfg.field(0, "random seed")
    save_every: int = cfg.field(20, "save the whole training state every N steps (0 = only on SIGTERM/SIGINT)")
    keep_last: int = cfg.field(1, "training states kept (the newest)")
    resume: str = cfg.field("auto", "auto (continue from the saved training state if there is one), never (start over) "
                                    "or must")
    resume_force: bool = cfg.field(False, "resume even when the config or the data differ from the saved state's")
    max_bad_steps: int = cfg.field(3, "stop after this many steps in a row with a non-finite loss or gradient norm "
                                      "(each is skipped)")


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the common start of two token lists, leaving at least one token of each after it."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def pair_scores(model, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B,) of the chosen and (B,) of the rejected conversations, with gradient; run it under autocast.

    A pair's two conversations share their opening (the prompt, a third of the tokens on the built-in
    task). One row per pair holds it once, then the rest of the chosen one, then the rest of the rejected
    one; the attention mask lets the rejected rest see the shared part and itself but not the chosen rest,
    and its position ids restart where the shared part ends, so every token's hidden state is the one it
    has in its own sequence. Each score is read at its conversation's last token, where the sequence
    classifier pools. Padding queries see only themselves (no all-masked rows, so no NaN). Attention
    kernels other than SDPA take no such mask: there each conversation is its own right-padded row.
    """
    backbone, head = model.base_model, getattr(model, "score", None)
    if model.config._attn_implementation not in ("sdpa", fast.TRAINING_ATTENTION) or head is None or backbone is model:
        ids, attention = pad_right([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
        scores = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits[:, 0]
        return scores.float().chunk(2)
    shared = [shared_prefix_length(chosen, rejected) for chosen, rejected in pairs]
    packed = pack_continuations([(chosen[:n], [chosen[n:], rejected[n:]])
                                 for (chosen, rejected), n in zip(pairs, shared)], pad_id)
    hidden = backbone(input_ids=packed.ids.to(device), attention_mask=packed.allowed[:, None].to(device),
                      position_ids=packed.position_ids.to(device), use_cache=False).last_hidden_state
    ends = [(first + len(chosen) - n - 1, second + len(rejected) - n - 1)  # the last token of each conversation
            for (chosen, rejected), n, (first, second) in zip(pairs, shared, packed.starts)]
    index = torch.tensor(ends, device=device)  # (B, 2)
    rows_index = torch.arange(len(pairs), device=device)[:, None]
    scores = head(hidden[rows_index, index])[..., 0].float()  # (B, 2)
    return scores[:, 0], scores[:, 1]


def main(config: Config) -> dict:
    """Train, save, and return the run's summary (`training` run to its end)."""
    return run_to_end(training(config))


def training(config: Config) -> Generator[dict, None, dict]:
    """The stage, steppable: set up, then yield after each optimiser step; at the end evaluate, save, return the
    summary.

    Each yield is that step's metrics and `batch_tokens`, the real (non-pad) tokens of the batch's 2B
    conversations as the data holds them (the shared prompt counted in each). `main` runs it to the end.
    """
    seed_everything(config.seed)
    device = distributed.start(pick_device(config.device))  # a process group under torchrun; nothing alone
    bf16 = resolve_bf16(config.bf16, device)
    out = Path(config.output_dir)
    check_writable(out)
    started = time.time()

    # 1. the starting model with a fresh one-output head
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    model = load_reward_model(model_path, device, tokenizer)
    if config.compile:
        fast.compile_layers(model)
    # FSDP2 shards under torchrun (`fsdp`); `pair_scores` calls the backbone and the score head one by one, so each
    # is a unit of its own
    model = distributed.parallel(model, config, bf16, device, units=[model.base_model, model.score])
    pad_id = model.config.pad_token_id
    say(f"[reward] from {model_path} on {device}")

    # 2. pairs → tokenised conversations; identical or empty pairs carry no preference and are skipped
    lengths = LengthPolicy(config.max_length, config.truncation)
    pairs = []
    usable, skipped = read_usable_preferences(resolve_data_path(config.data))
    for record, prompt, chosen, rejected in usable:
        margin = 0.0
        if config.margin_field:
            value = record.data.get(config.margin_field)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{record.where(config.margin_field)}: expected a number for the margin, "
                                 f"got {value!r}")
            margin = float(value)
        c = lengths.fit(encode_conversation(tokenizer, prompt, chosen))
        r = lengths.fit(encode_conversation(tokenizer, prompt, rejected))
        if c is not None and r is not None and c == r:  # cut to the same tokens: nothing left to prefer
            skipped["identical_after_truncation"] = skipped.get("identical_after_truncation", 0) + 1
        elif c is not None and r is not None:
            pairs.append((c, r, margin))
    if len(pairs) < 2:
        raise ValueError(f"{config.data}: need at least 2 usable pairs, found {len(pairs)} "
                         f"({skipped['identical']} identical, {skipped['empty']} empty, {lengths.skipped} too long "
                         f"skipped)")
    random.Random(config.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * config.eval_fraction)) if config.eval_fraction > 0 else 0
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    say(f"[reward] {len(train_pairs)} train / {len(eval_pairs)} held-out pairs "
        f"(skipped: {skipped['identical']} identical, {skipped['empty']} empty, {lengths.skipped} too long, "
        f"{skipped.get('identical_after_truncation', 0)} identical once cut to max_length; {lengths.truncated} "
        f"truncated from the left, the answers kept)")

    # 3. train with the Bradley–Terry loss; chosen and rejected go through one forward pass. The whole state is saved
    #    every save_every steps and on SIGTERM/SIGINT, and a rerun continues from it
    steps = max(1, round(len(train_pairs) / config.batch_size * config.epochs))
    optimizer, schedule = optimizer_and_schedule(model.parameters(), config.lr, config.weight_decay, steps,
                                                 int(config.warmup_ratio * steps))
    rng = random.Random(config.seed + 1)
    order: list[int] = []
    bad_steps = BadSteps("reward", config.max_bad_steps)
    state = TrainingState("reward", config, {"model": model_path, "data": resolve_data_path(config.data)}, out)
    modules = {"model": model}
    start, extra = state.resume(modules, optimizer, schedule)
    if extra:
        rng.setstate(extra["rng"])
        order[:] = extra["order"]
        bad_steps.load_state_dict(extra["bad_steps"])

    def trainer_values() -> dict:
        return {"rng": rng.getstate(), "order": list(order), "bad_steps": bad_steps.state_dict()}

    log_dir = out.parent / f"{out.name}_logs"
    trim_metrics(log_dir, start)
    log = RunLog(log_dir)
    from tqdm.auto import tqdm

    bar = tqdm(range(start, steps), desc="reward", unit="step", initial=start, total=steps,
               disable=not distributed.is_main())
    state.watch_signals()
    try:
        for step in bar:
            # every process draws the same global batch and takes its slice of it (all of it when alone)
            batch = distributed.shard([train_pairs[i] for i in next_batch(order, len(train_pairs), config.batch_size,
                                                                          rng)])
            with autocast(device, bf16):
                chosen_scores, rejected_scores = pair_scores(model, [(c, r) for c, r, _ in batch], pad_id, device)
            margin = torch.tensor([m for _, _, m in batch], device=device) if config.margin_field else None
            loss, stats = bradley_terry_loss(chosen_scores, rejected_scores, margin)
            # the mean over the global batch's pairs: this process's share of it, the gradients summed over processes
            distributed.share_of_global_mean(loss, len(batch)).backward()
            grad_norm = distributed.clip_gradients(model, 1.0)
            stats = distributed.weighted_mean({"loss": loss.detach(), **stats}, len(batch))
            if bad_steps.ok(step, loss=stats["loss"], grad_norm=grad_norm):  # else no update: the weights stay good
                optimizer.step()
                schedule.step()
            optimizer.zero_grad(set_to_none=True)
            row = log.log(step, {**stats, "grad_norm": grad_norm, "lr": schedule.get_last_lr()[0],
                                 "bad_steps": bad_steps.total})
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
            if state.due(step + 1) and step + 1 < steps and not bad_steps.in_a_row:  # keep the last good one
                state.save(step + 1, modules, optimizer, schedule, trainer_values())
            state.stop_if_asked(step + 1, modules, optimizer, schedule, trainer_values())
            yield {**row, "batch_tokens": sum(len(c) + len(r) for c, r, _ in batch)}
    finally:
        state.release_signals()

    bad_steps.check_last(steps)

    # 4. held-out pairwise accuracy, and the score scale on the reference policy's own samples (under torchrun each
    #    process scores its part, with the whole weights gathered once, and every process gets every score)
    def scores_of(sequences: list[list[int]]) -> torch.Tensor:
        part = distributed.my_part(sequences)
        with distributed.gathered(model):
            scores = score_sequences(model, part, pad_id, device, bf16) if part else torch.empty(0)
        return torch.cat(distributed.gather_objects(scores))

    def pairwise_accuracy(subset):
        if not subset:
            return float("nan")
        s = scores_of([c for c, _, _ in subset] + [r for _, r, _ in subset])
        return (s[: len(subset)] > s[len(subset):]).float().mean().item()

    eval_accuracy = pairwise_accuracy(eval_pairs)
    reference_scores = scores_of([c for c, _, _ in train_pairs] + [r for _, r, _ in train_pairs])
    train_accuracy = (reference_scores[: len(train_pairs)] > reference_scores[len(train_pairs):]).float().mean().item()
    norm = {"mean": reference_scores.mean().item(), "std": max(reference_scores.std().item(), 1e-6),
            "n": len(reference_scores), "note": "scores of the pairs' responses (reference-policy samples)"}
    log.log(steps, {"eval_accuracy": eval_accuracy, "train_accuracy": train_accuracy})
    log.close()

    # 5. save: a folder AutoModelForSequenceClassification loads, plus the normalisation
    summary = {"stage": "reward", "steps": steps, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
               "eval_accuracy": eval_accuracy, "train_accuracy": train_accuracy,
               "skipped_identical": skipped["identical"], "skipped_empty": skipped["empty"],
               "skipped_identical_after_truncation": skipped.get("identical_after_truncation", 0),
               "skipped_too_long": lengths.skipped, "truncated": lengths.truncated, "bad_steps": bad_steps.total,
               "seconds": round(time.time() - started, 1)}
    final = gathered_for_saving(model)  # the whole weights on rank 0, from every process's shards
    if final is not None:
        save_atomic(out, model=final, tokenizer=tokenizer,
                    json_files={"rlhf_config.json": cfg.to_dict(config), "rlhf_reward_norm.json": norm,
                                "rlhf_summary.json": summary})
    state.finished()
    distributed.barrier()
    say(f"[reward] held-out pairwise accuracy {eval_accuracy:.3f} on {len(eval_pairs)} pairs "
        f"(train {train_accuracy:.3f}); saved {out} ({summary['seconds']} s)")
    return summary
