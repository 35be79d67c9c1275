"""DPO: the policy learns from the preference pairs directly, with no reward model and no sampling.

What: for each pair, h = [log π(chosen) − log π_ref(chosen)] − [log π(rejected) − log π_ref(rejected)],
with log-probs summed over the response tokens (the answer + EOS, as `rlhf sft` encodes it), and the
loss −log σ(β·h) raises the chosen answer against the rejected one, measured from the frozen reference
(the SFT model). β·(log π − log π_ref) is the implicit reward: its accuracy and margin on held-out
pairs say how well the policy learned the preferences. Variants (`--loss`): IPO (a squared loss to a
fixed gap), conservative DPO (label smoothing), SimPO (no reference, length-normalised, with a margin).
Papers: Rafailov et al. 2023 (DPO); Azar et al. 2023 (IPO); Mitchell 2023 (cDPO); Meng et al. 2024 (SimPO).
Our deviations: chosen and rejected go through one forward pass, and logits are computed only from the
shortest prompt's end on (earlier positions predict prompt tokens, which nothing scores). With LoRA the
reference is the same weights with the adapter off; with `precompute_reference` the reference
log-probs of every pair come from one pass before training and the reference model is freed. IPO is fed
per-token mean log-probs (as its authors and TRL do), SimPO too (as in its paper); DPO and cDPO sums.
A pair longer than `max_length` keeps one prompt for both answers (cut against the longer answer).
Pairs with identical or empty answers carry no preference: they are skipped and counted.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator

import torch
from tqdm.auto import tqdm

from rlhf import config as cfg
from rlhf import distributed, fast, losses
from rlhf.checkpoint import TrainingState, trim_metrics
from rlhf.data import (
    LengthPolicy,
    encode_prompt,
    encode_response,
    next_batch,
    pad_right,
    read_usable_preferences,
    resolve_data_path,
)
from rlhf.guard import BadSteps
from rlhf.hardware import Precision, autocast, pick_device, resolve_bf16
from rlhf.models import (
    adapter_disabled,
    add_lora,
    answer_logprobs,
    backbone_and_head,
    check_writable,
    count_parameters,
    gathered_for_saving,
    load_causal_lm,
    load_tokenizer,
    optimizer_and_schedule,
    prompt_once_hidden,
    resolve_model_path,
    save_atomic,
)
from rlhf.ops import logprobs_from_logits, masked_sum
from rlhf.tracking import RunLog, run_to_end, say, seed_everything

Pair = tuple[list[int], list[int], list[int]]  # prompt ids, chosen ids, rejected ids
LOSSES = ("dpo", "ipo", "cdpo", "simpo")


@dataclass
class Config:
    model: str = cfg.field("default", "the SFT model the policy starts from: a folder, 'default' (embedded SmolLM2) or "
                                      "'tiny'")
    reference: str = cfg.field("", "the frozen reference model ('' = the same as model; with LoRA, the adapter "
                                   "switched off)")
    data: str = cfg.field("runs/pairs/pairs.jsonl", "preference pairs (prompt, chosen, rejected; strings or message "
                                                    "lists)")
    output_dir: str = cfg.field("runs/dpo", "where the trained policy is written")
    loss: str = cfg.field("dpo", "dpo, ipo, cdpo (label smoothing) or simpo (reference-free)")
    beta: float = cfg.field(0.1, "β of dpo, ipo (its τ) and cdpo: how far the policy may move from the reference")
    label_smoothing: float = cfg.field(0.1, "cdpo: assumed share of flipped preference labels")
    simpo_beta: float = cfg.field(2.0, "simpo: β on the mean per-token log-prob (the paper uses 2 to 2.5)")
    simpo_gamma: float = cfg.field(0.5, "simpo: target reward margin γ")
    eval_fraction: float = cfg.field(0.1, "share of pairs held out to measure implicit-reward accuracy")
    epochs: float = cfg.field(1.0, "passes over the training pairs")
    batch_size: int = cfg.field(8, "pairs per optimiser step (2× sequences in the forward pass)")
    lr: float = cfg.field(5e-6, "peak learning rate (5e-7 to 1e-6 is usual for long runs of large models; "
                               "our runs are tens of steps on 135M: 5e-6; with LoRA use ~5e-5)")
    weight_decay: float = cfg.field(0.0, "AdamW weight decay")
    warmup_ratio: float = cfg.field(0.1, "fraction of steps warming the learning rate up")
    max_length: int = cfg.field(256, "longest prompt+answer in tokens")
    truncation: str = cfg.field("truncate", "longer pairs: truncate or skip")
    precompute_reference: bool = cfg.field(False, "compute reference log-probs for every pair before training, then "
                                                  "free the reference")
    lora_r: int = cfg.field(0, "LoRA rank (0 = train all weights); with LoRA the reference is the adapter switched off")
    lora_alpha: int = cfg.field(16, "LoRA alpha")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    compile: bool = cfg.field(False, "torch.compile each decoder layer for the training and scoring passes (generation "
                                     "stays eager): faster steps after a one-off compile; needs a C++ compiler")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    fsdp: distributed.Sharding = cfg.field("auto", "shard the weights, gradients and optimiser state (and the frozen "
                                                   "reference's weights) over the processes with FSDP2: auto (with "
                                                   "more than one process), true or false (each process a full copy)")
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

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise cfg.ConfigError(f"'loss' must be one of {', '.join(LOSSES)}, got {self.loss!r}")


def pair_logprobs(model, batch: list[Pair], pad_id: int, device: torch.device,
                  bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (2B,) of each pair's answers given the prompt, and their token counts (2B,), the B chosen
    first, then the B rejected, from ONE forward pass.

    A pair's two answers follow one copy of its prompt in one row (`prompt_once_hidden`: each answer sees the prompt
    and itself, with its own positions), so the prompt is read once, not twice. Where the model cannot take that
    (`backbone_and_head`), the 2B right-padded sequences, with logits kept only from the shortest prompt's last
    token on (`answer_logprobs`).
    """
    if backbone_and_head(model) is None:
        sequences = [(p, c) for p, c, _ in batch] + [(p, r) for p, _, r in batch]
        logprobs, mask = answer_logprobs(model, sequences, pad_id, device, bf16)
        return masked_sum(logprobs, mask, dim=1), mask.sum(1)
    answers = [c for _, c, _ in batch] + [r for _, _, r in batch]
    targets, mask = pad_right(answers, pad_id)
    with autocast(device, bf16):
        hidden = prompt_once_hidden(model, [(p, [c, r]) for p, c, r in batch], device)  # c0, r0, c1, r1, ...
        order = torch.arange(2 * len(batch)).view(-1, 2).T.reshape(-1)  # → c0, c1, ..., r0, r1, ...
        logits = backbone_and_head(model)[1](hidden[order.to(device)])
    mask = mask.bool().to(device)
    return masked_sum(logprobs_from_logits(logits, targets.to(device)), mask, dim=1), mask.sum(1)


@torch.no_grad()
def all_pair_logprobs(model, pairs: list[Pair], pad_id: int, device: torch.device, bf16: bool,
                      batch_size: int, split: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_logprobs` over many pairs, without gradient → summed log-probs and token counts, (N, 2) each.

    Column 0 is the chosen answer, column 1 the rejected one; pairs of similar length share a batch. `split`: the
    pairs are the same list on every process (all the held-out pairs, all the training pairs), so under torchrun
    each process computes its part of them, with the model's whole weights gathered once for all its batches
    (`distributed.gathered`), and every process gets every pair's numbers. Without it each process computes its own
    pairs (its slice of a batch).
    """
    mine = list(distributed.part_of(len(pairs)) if split else range(len(pairs)))
    order = sorted(mine, key=lambda i: sum(map(len, pairs[i])))
    logprobs, lengths = torch.empty(len(pairs), 2), torch.empty(len(pairs), 2)
    batches = range(0, len(order), batch_size)
    with distributed.gathered(model if split else None):
        for start in tqdm(batches, desc="log-probs", unit="batch", leave=False,
                          disable=len(batches) < 2 or not distributed.is_main()):
            index = order[start:start + batch_size]
            lp, n = pair_logprobs(model, [pairs[i] for i in index], pad_id, device, bf16)
            logprobs[index] = lp.float().view(2, -1).T.cpu()
            lengths[index] = n.float().view(2, -1).T.cpu()
    if split and distributed.is_distributed():
        for index, part_logprobs, part_lengths in distributed.gather_objects((mine, logprobs[mine], lengths[mine])):
            logprobs[index], lengths[index] = part_logprobs, part_lengths
    return logprobs, lengths


def reference_logprobs(reference, policy, pairs: list[Pair], pad_id: int, device: torch.device, bf16: bool,
                       batch_size: int, split: bool = False) -> torch.Tensor:
    """Summed reference log-probs (N, 2) [chosen, rejected]: `reference`'s, or the policy's with its adapter off."""
    if reference is not None:
        return all_pair_logprobs(reference, pairs, pad_id, device, bf16, batch_size, split)[0]
    with adapter_disabled(policy):
        return all_pair_logprobs(policy, pairs, pad_id, device, bf16, batch_size, split)[0]


def pick_loss(config: Config) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict]]:
    """`config.loss` → f(logprobs, lengths, ref_logprobs) → (loss, stats), on (2B,) tensors with the chosen half first.

    logprobs and ref_logprobs are sums over the answer tokens, lengths the token counts; IPO and SimPO
    compare per-token means (ref_logprobs is None for SimPO).
    """
    table = {
        "dpo": lambda lp, n, ref: losses.dpo_loss(*lp.chunk(2), *ref.chunk(2), beta=config.beta),
        "ipo": lambda lp, n, ref: losses.ipo_loss(*(lp / n).chunk(2), *(ref / n).chunk(2), beta=config.beta),
        "cdpo": lambda lp, n, ref: losses.cdpo_loss(*lp.chunk(2), *ref.chunk(2), beta=config.beta,
                                                    label_smoothing=config.label_smoothing),
        "simpo": lambda lp, n, ref: losses.simpo_loss(*(lp / n).chunk(2), beta=config.simpo_beta,
                                                      gamma=config.simpo_gamma),
    }
    if config.loss not in table:
        raise ValueError(f"loss must be one of {', '.join(table)}; got '{config.loss}'")
    return table[config.loss]


def main(config: Config) -> dict:
    """Train, evaluate, save, and return the run's summary (`training` run to its end)."""
    return run_to_end(training(config))


def training(config: Config) -> Generator[dict, None, dict]:
    """The stage, steppable: set up, then yield after each optimiser step; at the end evaluate, save, return the
    summary.

    Each yield is that step's logged metrics and `batch_tokens`, the real (non-pad) tokens of the batch's
    2B prompt + answer sequences. `main` runs it to the end; a benchmark can time it step by step.
    """
    loss_fn = pick_loss(config)
    seed_everything(config.seed)
    device = distributed.start(pick_device(config.device))  # a process group under torchrun; nothing alone
    bf16 = resolve_bf16(config.bf16, device)
    out = Path(config.output_dir)
    check_writable(out)
    started = time.time()
    needs_reference = config.loss != "simpo"
    sharded = distributed.use_fsdp(config.fsdp)

    # 1. the policy (+ LoRA) and the frozen reference: a folder of its own, or the policy's adapter switched off
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    pad_id = tokenizer.pad_token_id
    policy = load_causal_lm(model_path, device)
    if config.lora_r > 0:
        policy = add_lora(policy, config.lora_r, config.lora_alpha)
    reference, reference_name = None, "none (SimPO is reference-free)"
    if needs_reference and (config.reference or config.lora_r == 0):
        reference_path = resolve_model_path(config.reference) if config.reference else model_path
        if config.reference and load_tokenizer(reference_path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"reference {reference_path} has another tokenizer than the model {model_path}")
        # FSDP shards the frozen reference like the policy: it is as large as the policy, and a full copy on every
        # process would take back much of what sharding the policy saved; without gradients or optimiser state its
        # cost is the layer-by-layer gathering in its forward passes (one pass in all with precompute_reference).
        # Its Linear weights stay fp32 there: FSDP shards one dtype per unit
        reference = load_causal_lm(reference_path, device, trainable=False, bf16_linears=bf16 and not sharded)
        reference = distributed.parallel(reference, config, bf16, device)
        reference_name = str(reference_path)
    elif needs_reference:
        reference_name = f"{model_path} with the LoRA adapter off"
    if config.compile:
        fast.compile_layers(policy, reference)
    trainable, total = count_parameters(policy)
    policy = distributed.parallel(policy, config, bf16, device)  # FSDP2 shards under torchrun (`fsdp`)
    say(f"[dpo] {config.loss}: policy {model_path} ({trainable / 1e6:.1f}M of {total / 1e6:.1f}M trained), "
        f"reference {reference_name}, on {device}")

    # 2. pairs → (prompt ids, chosen ids + EOS, rejected ids + EOS); identical or empty answers are skipped
    lengths = LengthPolicy(config.max_length, config.truncation)
    pairs: list[Pair] = []
    usable, skipped = read_usable_preferences(resolve_data_path(config.data))
    for _, prompt, chosen, rejected in usable:
        chosen_ids, rejected_ids = encode_response(tokenizer, chosen), encode_response(tokenizer, rejected)
        # one prompt for both answers: fit it against the longer one, then cut both to the room left
        fitted = lengths.fit_prompt_response(encode_prompt(tokenizer, prompt), max(chosen_ids, rejected_ids, key=len))
        if fitted is None:
            continue
        room = config.max_length - len(fitted[0])
        if chosen_ids[:room] == rejected_ids[:room]:  # the answers differ only after the cut
            skipped["identical"] += 1
            continue
        pairs.append((fitted[0], chosen_ids[:room], rejected_ids[:room]))
    if not pairs:
        raise ValueError(f"{config.data}: no usable pairs ({skipped['identical']} identical, {skipped['empty']} empty, "
                         f"{lengths.skipped} too long skipped)")
    random.Random(config.seed).shuffle(pairs)
    n_eval = min(max(1, int(len(pairs) * config.eval_fraction)), len(pairs) - 1) if config.eval_fraction > 0 else 0
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    say(f"[dpo] {len(train_pairs)} train / {len(eval_pairs)} held-out pairs "
        f"(skipped: {skipped['identical']} identical, {skipped['empty']} empty, {lengths.skipped} too long; "
        f"{lengths.truncated} truncated)")

    # 3. reference log-probs of the held-out pairs, and with precompute_reference of every training pair,
    #    after which the reference model is freed
    eval_ref = train_ref = None
    if needs_reference:
        eval_ref = reference_logprobs(reference, policy, eval_pairs, pad_id, device, bf16, config.batch_size,
                                      split=True)
        if config.precompute_reference:
            train_ref = reference_logprobs(reference, policy, train_pairs, pad_id, device, bf16, config.batch_size,
                                           split=True)
            freed, reference = reference is not None, None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            say(f"[dpo] reference log-probs precomputed for {len(pairs)} pairs"
                + ("; reference model freed" if freed else ""))

    # 4. train: chosen and rejected in one forward pass; the reference's log-probs without gradient. The whole state
    #    is saved every save_every steps and on SIGTERM/SIGINT, and a rerun continues from it
    steps = max(1, round(len(train_pairs) / config.batch_size * config.epochs))
    optimizer, schedule = optimizer_and_schedule(policy.parameters(), config.lr, config.weight_decay, steps,
                                                 int(config.warmup_ratio * steps))
    rng = random.Random(config.seed + 1)
    order: list[int] = []
    history: list[dict] = []
    bad_steps = BadSteps(config.loss, config.max_bad_steps)
    inputs = {"model": model_path, "data": resolve_data_path(config.data)}
    if config.reference:
        inputs["reference"] = resolve_model_path(config.reference)
    state = TrainingState("dpo", config, inputs, out)
    modules = {"policy": policy}
    start, extra = state.resume(modules, optimizer, schedule)
    if extra:
        rng.setstate(extra["rng"])
        order[:] = extra["order"]
        history[:] = extra["history"]
        bad_steps.load_state_dict(extra["bad_steps"])

    def trainer_values() -> dict:
        return {"rng": rng.getstate(), "order": list(order), "history": history, "bad_steps": bad_steps.state_dict()}

    log_dir = out.parent / f"{out.name}_logs"
    trim_metrics(log_dir, start)
    log = RunLog(log_dir)
    bar = tqdm(range(start, steps), desc=config.loss, unit="step", initial=start, total=steps,
               disable=not distributed.is_main())
    state.watch_signals()
    try:
        for step in bar:
            step_started = time.time()
            # every process draws the same global batch and takes its slice of it (all of it when alone)
            index = distributed.shard(next_batch(order, len(train_pairs), config.batch_size, rng))
            batch = [train_pairs[i] for i in index]
            ref = None
            if train_ref is not None:
                ref = train_ref[index].T.reshape(-1).to(device)  # (2B,): chosen then rejected
            elif needs_reference:
                ref = reference_logprobs(reference, policy, batch, pad_id, device, bf16,
                                         len(batch)).T.reshape(-1).to(device)
            logprobs, n_tokens = pair_logprobs(policy, batch, pad_id, device, bf16)
            loss, stats = loss_fn(logprobs, n_tokens, ref)
            # the mean over the global batch's pairs: this process's share of it, the gradients summed over processes
            distributed.share_of_global_mean(loss, len(batch)).backward()
            grad_norm = distributed.clip_gradients(policy, 1.0)
            # sequence log-probs (sums) in the log for every loss, also where the loss compared per-token means
            chosen_logprobs, rejected_logprobs = logprobs.detach().chunk(2)
            stats = distributed.weighted_mean({"loss": loss.detach(), **stats,
                                               "chosen_logprobs": chosen_logprobs.mean(),
                                               "rejected_logprobs": rejected_logprobs.mean()}, len(batch))
            if bad_steps.ok(step, loss=stats["loss"], grad_norm=grad_norm):  # else no update: the weights stay good
                optimizer.step()
                schedule.step()
            optimizer.zero_grad(set_to_none=True)
            row = log.log(step, {**stats, "grad_norm": grad_norm, "lr": schedule.get_last_lr()[0],
                                 "bad_steps": bad_steps.total, "step_seconds": time.time() - step_started})
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.3f}")
            if state.due(step + 1) and step + 1 < steps and not bad_steps.in_a_row:  # keep the last good one
                state.save(step + 1, modules, optimizer, schedule, trainer_values())
            state.stop_if_asked(step + 1, modules, optimizer, schedule, trainer_values())
            yield {**row, "batch_tokens": sum(2 * len(p) + len(c) + len(r) for p, c, r in batch)}
    finally:
        state.release_signals()

    bad_steps.check_last(steps)

    # 5. held-out pairs: the loss, implicit-reward accuracy and margin of the trained policy
    held_out = {"eval_loss": float("nan"), "eval_accuracy": float("nan"), "eval_margin": float("nan")}
    if eval_pairs:
        lp, n = all_pair_logprobs(policy, eval_pairs, pad_id, device, bf16, config.batch_size, split=True)
        eval_loss, eval_stats = loss_fn(lp.T.reshape(-1), n.T.reshape(-1),
                                        None if eval_ref is None else eval_ref.T.reshape(-1))
        held_out = {"eval_loss": float(eval_loss), "eval_accuracy": float(eval_stats["accuracy"]),
                    "eval_margin": float(eval_stats["margin"])}
        log.log(steps, held_out)
    log.close()

    # 6. save the policy (LoRA merged) as a plain causal-LM folder, with the resolved config beside it (rank 0, once)
    keys = ("loss", "accuracy", "margin", "chosen_logprobs", "rejected_logprobs")
    summary = {"stage": "dpo", "loss": config.loss, "steps": steps, "train_pairs": len(train_pairs),
               "eval_pairs": len(eval_pairs), **held_out, "final_loss": history[-1]["loss"],
               "first": {k: history[0][k] for k in keys}, "last": {k: history[-1][k] for k in keys},
               "reference": reference_name, "precompute_reference": config.precompute_reference,
               "skipped_identical": skipped["identical"], "skipped_empty": skipped["empty"],
               "skipped_too_long": lengths.skipped,
               "truncated": lengths.truncated, "bad_steps": bad_steps.total,
               "seconds": round(time.time() - started, 1)}
    final = gathered_for_saving(policy)  # the whole weights on rank 0 (LoRA merged), from every process's shards
    if final is not None:
        save_atomic(out, model=final, tokenizer=tokenizer,
                    json_files={"rlhf_config.json": cfg.to_dict(config), "rlhf_summary.json": summary})
    state.finished()
    distributed.barrier()
    held_out_text = (f"held-out implicit-reward accuracy {held_out['eval_accuracy']:.3f}, margin "
                     f"{held_out['eval_margin']:.3f} on {len(eval_pairs)} pairs; " if eval_pairs else "")
    say(f"[dpo] {held_out_text}loss {summary['first']['loss']:.3f} → {summary['final_loss']:.3f}; "
        f"saved {out} ({summary['seconds']} s)")
    return summary
