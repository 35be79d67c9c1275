"""Stage 1: supervised fine-tuning on prompt → response demonstrations.

What: maximise the likelihood of the demonstrated answers, with the loss on the response tokens only
(the prompt is context, not something to imitate), the model's chat template applied, and the
answer closed by the EOS token so the model learns to stop.
Paper: Ouyang et al. 2022 (InstructGPT), step 1.
Our deviations: token-level mean loss over the batch; a multi-turn conversation teaches every assistant turn (one
example per turn, with the conversation before it as the prompt; `assistant_turns: last` keeps only the last);
examples longer than `max_length` are cut from the prompt's left (or skipped) and counted, never a crash. Logits
are computed only from the batch's shortest prompt's end on (`logits_to_keep`): earlier positions predict prompt
tokens, which the loss ignores.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator

from rlhf import config as cfg
from rlhf import distributed, fast
from rlhf.checkpoint import TrainingState, trim_metrics
from rlhf.data import LengthPolicy, encode_prompt, encode_response, next_batch, read_demonstrations, resolve_data_path
from rlhf.guard import BadSteps
from rlhf.hardware import Precision, pick_device, resolve_bf16
from rlhf.losses import sft_loss
from rlhf.models import (
    add_lora,
    answer_logprobs,
    check_writable,
    count_parameters,
    gathered_for_saving,
    load_causal_lm,
    load_tokenizer,
    optimizer_and_schedule,
    resolve_model_path,
    save_atomic,
)
from rlhf.tracking import RunLog, run_to_end, say, seed_everything


@dataclass
class Config:
    model: str = cfg.field("default", "a Hugging Face causal-LM folder, or 'default' for the embedded "
                                      "SmolLM2-135M-Instruct")
    data: str = cfg.field("builtin:demonstrations", "demonstrations file (JSONL/JSON/CSV/Parquet) or "
                                                    "builtin:demonstrations")
    output_dir: str = cfg.field("runs/sft", "where the fine-tuned model is written")
    epochs: float = cfg.field(1.0, "passes over the demonstrations (fractions allowed)")
    batch_size: int = cfg.field(8, "examples per optimiser step (the global batch: split over the processes under "
                                   "torchrun)")
    lr: float = cfg.field(5e-5, "peak learning rate")
    weight_decay: float = cfg.field(0.0, "AdamW weight decay")
    warmup_ratio: float = cfg.field(0.1, "fraction of steps spent warming the learning rate up")
    max_length: int = cfg.field(256, "longest prompt+response in tokens")
    truncation: str = cfg.field("truncate", "what to do with longer examples: truncate or skip")
    assistant_turns: str = cfg.field("all", "multi-turn conversations: learn 'all' assistant turns (one example per "
                                            "turn, the conversation before it as its prompt) or only the 'last'",
                                     check=cfg.one_of("all", "last"))
    lora_r: int = cfg.field(0, "LoRA rank (0 = train all weights)")
    lora_alpha: int = cfg.field(16, "LoRA alpha")
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
    log_every: int = cfg.field(1, "log metrics every N steps")
    save_every: int = cfg.field(20, "save the whole training state every N steps (0 = only on SIGTERM/SIGINT)")
    keep_last: int = cfg.field(1, "training states kept (the newest)")
    resume: str = cfg.field("auto", "auto (continue from the saved training state if there is one), never (start over) "
                                    "or must")
    resume_force: bool = cfg.field(False, "resume even when the config or the data differ from the saved state's")
    max_bad_steps: int = cfg.field(3, "stop after this many steps in a row with a non-finite loss or gradient norm "
                                      "(each is skipped)")


def main(config: Config) -> dict:
    """Train, save, and return the run's summary (`training` run to its end)."""
    return run_to_end(training(config))


def training(config: Config) -> Generator[dict, None, dict]:
    """The stage, steppable: set up, then yield after each optimiser step; at the end save and return the summary.

    Each yield is that step's metrics (tensors, not synchronised) and `batch_tokens`, the real (non-pad)
    tokens of the batch. `main` runs it to the end; a benchmark can time it step by step.
    """
    seed_everything(config.seed)
    device = distributed.start(pick_device(config.device))  # a process group under torchrun; nothing alone
    bf16 = resolve_bf16(config.bf16, device)
    out = Path(config.output_dir)
    check_writable(out)
    started = time.time()

    # 1. model and tokenizer
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, device)
    if config.lora_r > 0:
        model = add_lora(model, config.lora_r, config.lora_alpha)
    if config.compile:
        fast.compile_layers(model)
    trainable, total = count_parameters(model)
    model = distributed.parallel(model, config, bf16, device)  # FSDP2 shards under torchrun (`fsdp`)
    say(f"[sft] model {model_path} ({trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters trained) on {device}")

    # 2. demonstrations → (prompt ids, response ids + EOS); loss only on the response part
    lengths = LengthPolicy(config.max_length, config.truncation)
    examples = []
    for prompt, completion in read_demonstrations(resolve_data_path(config.data),
                                                  every_turn=config.assistant_turns == "all"):
        fitted = lengths.fit_prompt_response(encode_prompt(tokenizer, prompt), encode_response(tokenizer, completion))
        if fitted is not None and fitted[1]:
            examples.append(fitted)
    if not examples:
        raise ValueError(f"{config.data}: no usable demonstrations (skipped {lengths.skipped} longer than max_length)")
    say(f"[sft] {len(examples)} demonstrations ({lengths.truncated} truncated, {lengths.skipped} skipped at "
        f"max_length={config.max_length})")

    # 3. train; the whole state is saved every save_every steps and on SIGTERM/SIGINT, and a rerun continues from it
    steps_per_epoch = max(1, len(examples) // config.batch_size)
    total_steps = max(1, round(steps_per_epoch * config.epochs))
    optimizer, schedule = optimizer_and_schedule(model.parameters(), config.lr, config.weight_decay, total_steps,
                                                 int(config.warmup_ratio * total_steps))
    rng = random.Random(config.seed)
    order: list[int] = []
    bad_steps = BadSteps("sft", config.max_bad_steps)
    state = TrainingState("sft", config, {"model": model_path, "data": resolve_data_path(config.data)}, out)
    modules = {"model": model}
    start, extra = state.resume(modules, optimizer, schedule)
    if extra:
        rng.setstate(extra["rng"])
        order[:] = extra["order"]
        bad_steps.load_state_dict(extra["bad_steps"])
    last = extra.get("last", {"loss": float("nan")})

    def trainer_values() -> dict:
        return {"rng": rng.getstate(), "order": list(order), "bad_steps": bad_steps.state_dict(), "last": last}

    log_dir = out.parent / f"{out.name}_logs"
    trim_metrics(log_dir, start)
    log = RunLog(log_dir)
    from tqdm.auto import tqdm

    bar = tqdm(range(start, total_steps), desc="sft", unit="step", initial=start, total=total_steps,
               disable=not distributed.is_main())
    state.watch_signals()
    try:
        for step in bar:
            # every process draws the same global batch and takes its slice of it (all of it when alone)
            batch = distributed.shard([examples[i] for i in next_batch(order, len(examples), config.batch_size, rng)])
            # the loss asks the model to predict the response tokens only: the prompt is context
            logprobs, response_mask = answer_logprobs(model, batch, tokenizer.pad_token_id, device, bf16)
            loss, stats = sft_loss(logprobs, response_mask)
            # the token mean over the global batch: this process's share of it, the gradients summed over processes
            distributed.share_of_global_mean(loss, stats["tokens"]).backward()
            grad_norm = distributed.clip_gradients(model, 1.0)
            nll = distributed.weighted_mean({"nll": stats["nll"]}, stats["tokens"])["nll"]
            if bad_steps.ok(step, loss=nll, grad_norm=grad_norm):  # else no update: the weights stay good
                optimizer.step()
                schedule.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = {"loss": nll, "tokens": distributed.reduce_sum(stats["tokens"]).long(), "grad_norm": grad_norm,
                       "lr": schedule.get_last_lr()[0], "bad_steps": bad_steps.total}
            if step % config.log_every == 0 or step == total_steps - 1:
                row = log.log(step, metrics)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
            last = {"loss": float(nll)}
            if state.due(step + 1) and step + 1 < total_steps and not bad_steps.in_a_row:  # the last good one
                state.save(step + 1, modules, optimizer, schedule, trainer_values())
            state.stop_if_asked(step + 1, modules, optimizer, schedule, trainer_values())
            yield {"step": step, **metrics, "batch_tokens": sum(len(p) + len(r) for p, r in batch)}
    finally:
        state.release_signals()
        log.close()

    bad_steps.check_last(total_steps)

    # 4. save a Hugging Face folder atomically, with the resolved config beside the weights (rank 0, once)
    summary = {"stage": "sft", "steps": total_steps, "final_loss": last["loss"], "bad_steps": bad_steps.total,
               "examples": len(examples), "truncated": lengths.truncated, "skipped": lengths.skipped,
               "seconds": round(time.time() - started, 1)}
    final = gathered_for_saving(model)  # the whole weights on rank 0, from every process's shards
    if final is not None:
        save_atomic(out, model=final, tokenizer=tokenizer,
                    json_files={"rlhf_config.json": cfg.to_dict(config), "rlhf_summary.json": summary})
    state.finished()
    distributed.barrier()
    say(f"[sft] saved {out} (loss {summary['final_loss']:.3f}, {summary['seconds']} s)")
    return summary
