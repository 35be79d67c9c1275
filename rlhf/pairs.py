"""Preference pairs: sample two or more responses per prompt, then have an annotator choose.

What: the data-collection step between SFT and the reward model. The model (usually the SFT model)
answers each prompt `n_responses` times; an annotator compares every two answers of a prompt and
the result is written as preference JSONL (`prompt`, `chosen`, `rejected`) that `rlhf reward` reads.
The built-in annotator is the simulated one (`rlhf.annotators`), a noisy stand-in for a person.
With `annotator: none` the responses are written unlabelled as candidates
(`prompt`, `responses`) for people to label in `rlhf annotate`.
An answer can be given its first words (`openings`, for every prompt or per prompt row): the model goes on from
them. Two answers a model samples freely often do the same thing (both decline, both answer), and a pair of them
says nothing about that choice; an answer that opens as a refusal beside a free one puts the choice in front of
the annotator, who ranks the pair like any other.
Under torchrun each process answers its part of the prompts with a whole copy of the model (sampling needs no
gradients or optimiser state to shard, and a whole copy samples without any collective per token); rank 0 gathers
the answers, has them labelled and writes the file.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf import config as cfg
from rlhf import distributed
from rlhf.data import LengthPolicy, prompt_for_output, prompt_text, read_prompt_rows, resolve_data_path, write_jsonl
from rlhf.hardware import Precision, pick_device, resolve_bf16
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.rollout import sample
from rlhf.tracking import say, seed_everything


@dataclass
class Config:
    model: str = cfg.field("default", "the model that answers (a causal-LM folder or 'default')")
    data: str = cfg.field("builtin:prompts_train", "prompts file or builtin:prompts_train")
    output_dir: str = cfg.field("runs/pairs", "folder for pairs.jsonl (or candidates.jsonl)")
    max_prompts: int = cfg.field(0, "use only the first N prompts (0 = all)")
    n_responses: int = cfg.field(2, "responses sampled per prompt (every two of them make a pair)")
    max_new_tokens: int = cfg.field(64, "longest response in tokens")
    max_prompt_length: int = cfg.field(256, "longer prompts are cut from the left or skipped (see truncation)")
    truncation: str = cfg.field("truncate", "prompts over max_prompt_length: truncate or skip")
    temperature: float = cfg.field(1.0, "sampling temperature (diverse answers make informative pairs)")
    openings: list[str] = cfg.field([], "text that answer i of each prompt starts with, then sampled on ('' or none "
                                         "listed: sampled from the start); a prompt row's own `openings` field "
                                         "overrides it. An opening puts an answer the model gives rarely beside "
                                         "the ones it gives often")
    annotator: str = cfg.field("simulated", "who chooses: simulated, or none to write unlabelled candidates")
    annotator_noise: float = cfg.field(0.1, "label noise of the simulated annotator (Bradley–Terry temperature on the "
                                            "gold score)")
    batch_size: int = cfg.field(64, "prompts sampled at once")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    seed: int = cfg.field(0, "random seed")


def answer_openings(openings, n_responses: int, where: str) -> list[str]:
    """The opening of each of a prompt's `n_responses` answers ('' = sampled from the start), from a list of at
    most that many strings."""
    if not isinstance(openings, list) or not all(isinstance(o, str) for o in openings):
        raise ValueError(f"{where}: openings must be a list of strings, got {openings!r}")
    if len(openings) > n_responses:
        raise ValueError(f"{where}: openings: at most one per response (n_responses={n_responses}), got "
                         f"{len(openings)}")
    return openings + [""] * (n_responses - len(openings))


def main(config: Config) -> dict:
    if config.n_responses < 2:
        raise ValueError(f"n_responses must be at least 2 to make a pair, got {config.n_responses}")
    answer_openings(config.openings, config.n_responses, "openings")
    if config.annotator not in ("simulated", "none"):
        raise ValueError(f"annotator must be 'simulated' or 'none', got '{config.annotator}'")
    seed_everything(config.seed + distributed.rank())  # each process its own random stream
    started = time.time()
    device = distributed.start(pick_device(config.device))  # a process group under torchrun; nothing alone
    bf16 = resolve_bf16(config.bf16, device)
    out = Path(config.output_dir)

    # 1. prompts and the answering model
    rows = read_prompt_rows(resolve_data_path(config.data))
    if config.max_prompts:
        rows = rows[: config.max_prompts]
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    openings = [answer_openings(fields.get("openings", config.openings), config.n_responses,
                                f"{config.data}: row {number}") for number, (_, fields) in enumerate(rows, 1)]
    lengths = LengthPolicy(config.max_prompt_length, config.truncation)  # row by row, so each keeps its openings
    fitted = [(fit, opening) for (p, _), opening in zip(rows, openings)
              if (fit := lengths.fit_prompt_messages(tokenizer, p)) is not None]
    prompts, openings_of = [p for p, _ in fitted], [o for _, o in fitted]
    if not prompts:
        raise ValueError(f"{config.data}: every prompt is longer than max_prompt_length={config.max_prompt_length}")
    model = load_causal_lm(model_path, device, trainable=False, bf16_linears=bf16)
    say(f"[pairs] {len(prompts)} prompts × {config.n_responses} responses from {model_path} ({lengths.truncated} "
        f"truncated, {lengths.skipped} skipped at max_prompt_length={config.max_prompt_length})")

    # 2. sample every prompt n times in one batched pass (under torchrun: this process's part of the prompts, then
    #    every process's answers in prompt order)
    repeated = [p for p in distributed.my_part(prompts) for _ in range(config.n_responses)]
    openings = [o for per_prompt in distributed.my_part(openings_of) for o in per_prompt]
    texts, ended = [], []
    if repeated:
        rollout = sample(model, tokenizer, repeated, config.max_new_tokens, config.temperature,
                         batch_size=config.batch_size, bf16=bf16, progress=distributed.is_main(), openings=openings)
        texts, ended = rollout.texts, rollout.ended.tolist()
    parts = distributed.gather_objects((texts, ended))
    texts, ended = [t for part in parts for t in part[0]], [e for part in parts for e in part[1]]
    answers = [texts[i * config.n_responses:(i + 1) * config.n_responses] for i in range(len(prompts))]
    if not distributed.is_main():  # rank 0 labels and writes; the others wait for the file (a pipeline reads it next)
        distributed.barrier()
        return {"stage": "pairs", "responses": len(repeated)}
    say(f"[pairs] {sum(ended)}/{len(ended)} responses ended within {config.max_new_tokens} tokens")

    # 3. unlabelled candidates for people, or the simulated annotator's choices
    if config.annotator == "none":
        path = write_jsonl(out / "candidates.jsonl",
                           ({"prompt": prompt_for_output(p), "responses": a} for p, a in zip(prompts, answers)))
        summary = {"stage": "pairs", "candidates": len(prompts), "file": str(path)}
    else:
        from rlhf.annotators import SimulatedAnnotator

        annotator = SimulatedAnnotator(noise_temperature=config.annotator_noise, seed=config.seed, device=str(device))
        rows, identical = [], 0
        pair_prompts, firsts, seconds = [], [], []
        for prompt, responses in zip(prompts, answers):
            for a, b in itertools.combinations(responses, 2):
                if a.strip() == b.strip():
                    identical += 1  # no information in comparing an answer with itself
                    continue
                pair_prompts.append(prompt)
                firsts.append(a)
                seconds.append(b)
        choices = annotator.prefer_batch([prompt_text(p) for p in pair_prompts], firsts, seconds)
        for prompt, a, b, (choice, p_a) in zip(pair_prompts, firsts, seconds, choices):
            chosen, rejected = (a, b) if choice == 0 else (b, a)
            rows.append({"prompt": prompt_for_output(prompt), "chosen": chosen, "rejected": rejected,
                         "p_chosen": round(p_a if choice == 0 else 1 - p_a, 4)})
        path = write_jsonl(out / "pairs.jsonl", rows)
        summary = {"stage": "pairs", "pairs": len(rows), "identical_skipped": identical, "file": str(path)}
    summary["seconds"] = round(time.time() - started, 1)
    summary["ended_fraction"] = round(sum(ended) / max(1, len(ended)), 3)
    write_jsonl(out / "summary.jsonl", [summary])
    say(f"[pairs] wrote {summary['file']} ({summary['seconds']} s)")
    distributed.barrier()
    return summary
