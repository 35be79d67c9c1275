"""Held-out evaluation: gold score with bootstrap intervals, win rate, KL to a reference, length.

The gold judge is the built-in simulated annotator without noise; the policy never trained on it.
Every model answers the same held-out prompts with the same sampling settings, and the comparison
is paired per prompt (policy vs baseline on the same prompt).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rlhf import config as cfg
from rlhf.data import prompt_text, read_prompts, resolve_data_path, write_jsonl
from rlhf.tracking import say, seed_everything, table


# --- statistics ----------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low = means[int((1 - level) / 2 * resamples)]
    high = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return low, high


def win_rate(scores: Sequence[float], baseline: Sequence[float], tie_tolerance: float = 1e-9) -> tuple[float, int, int, int]:
    """Share of prompts where `scores` beats `baseline`, a tie counting half → (rate, wins, ties, losses)."""
    if len(scores) != len(baseline):
        raise ValueError(f"paired scores need equal lengths, got {len(scores)} and {len(baseline)}")
    wins = sum(1 for a, b in zip(scores, baseline) if a - b > tie_tolerance)
    losses = sum(1 for a, b in zip(scores, baseline) if b - a > tie_tolerance)
    ties = len(scores) - wins - losses
    return (wins + 0.5 * ties) / max(1, len(scores)), wins, ties, losses


# --- evaluation ----------------------------------------------------------------------------------


@dataclass
class Config:
    models: list[str] = cfg.field([], "checkpoints to evaluate (causal-LM folders); the first is the baseline")
    reference: str = cfg.field("", "model the KL is measured against ('' = the baseline)")
    data: str = cfg.field("builtin:prompts_heldout", "held-out prompts file or builtin:prompts_heldout")
    output_dir: str = cfg.field("runs/eval", "where results.json and samples.jsonl are written")
    max_prompts: int = cfg.field(0, "use only the first N prompts (0 = all)")
    max_new_tokens: int = cfg.field(64, "longest response in tokens")
    temperature: float = cfg.field(0.7, "sampling temperature (as in training)")
    batch_size: int = cfg.field(64, "prompts sampled at once")
    examples: int = cfg.field(3, "prompts shown with every model's answer side by side")
    bf16: bool = cfg.field(True, "bf16 autocast")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    seed: int = cfg.field(1234, "sampling seed (the same for every model)")


@torch.no_grad()
def sequence_kl(policy, reference, rollout, temperature: float, bf16: bool, device) -> torch.Tensor:
    """Per-response KL(π‖π_ref) estimated on the policy's own samples: Σ_t log π − log π_ref (k1)."""
    from rlhf.ops import logprobs_from_logits
    from rlhf.models import autocast
    from rlhf.rollout import forward_logits

    width = rollout.prompt_ids.shape[1]
    totals = []
    for start in range(0, rollout.response_ids.shape[0], 16):
        part = rollout.select(slice(start, start + 16))
        per_model = []
        for model in (policy, reference):
            with autocast(device, bf16):
                logits, _ = forward_logits(model, part.input_ids.to(device), part.attention_mask.to(device))
            per_model.append(logprobs_from_logits(logits[:, width - 1:-1], part.response_ids.to(device), temperature))
        totals.append(((per_model[0] - per_model[1]) * part.response_mask.to(device)).sum(1).cpu())
    return torch.cat(totals)


def main(config: Config, names: dict[str, str] | None = None) -> dict:
    from rlhf.annotators import SimulatedAnnotator
    from rlhf.models import load_causal_lm, load_tokenizer, pick_device, resolve_model_path
    from rlhf.rollout import sample

    if not config.models:
        raise ValueError("evaluate: name at least one model in 'models'")
    device = pick_device(config.device)
    started = time.time()
    prompts = read_prompts(resolve_data_path(config.data))
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    questions = [prompt_text(p) for p in prompts]
    judge = SimulatedAnnotator(noise_temperature=0.0, device=str(device))
    reference_path = resolve_model_path(config.reference or config.models[0])
    tokenizer = load_tokenizer(reference_path)
    reference = load_causal_lm(reference_path, device, trainable=False)

    # 1. every model answers every held-out prompt with the same seed and settings
    answers, golds, kls, lengths, ended = {}, {}, {}, {}, {}
    for name in config.models:
        path = resolve_model_path(name)
        model = reference if path == reference_path else load_causal_lm(path, device, trainable=False)
        seed_everything(config.seed)
        rollout = sample(model, tokenizer, prompts, config.max_new_tokens, config.temperature,
                         batch_size=config.batch_size, bf16=config.bf16, progress=True)
        answers[name] = rollout.texts
        # 2. the gold judge scores; KL to the reference on the model's own samples
        golds[name] = judge.gold_scores(questions, rollout.texts)
        kls[name] = sequence_kl(model, reference, rollout, config.temperature, config.bf16, device).tolist()
        lengths[name] = rollout.lengths.float().tolist()
        ended[name] = rollout.ended.float().tolist()

    # 3. statistics against the baseline (the first model)
    baseline = config.models[0]
    rows = []
    for name in config.models:
        g = golds[name]
        low, high = bootstrap_ci(g, seed=config.seed)
        row = {"model": name, "gold": sum(g) / len(g), "gold_ci": [low, high],
               "kl_to_reference": sum(kls[name]) / len(kls[name]),
               "length_tokens": sum(lengths[name]) / len(lengths[name]),
               "ended": sum(ended[name]) / len(ended[name])}
        if name != baseline:
            diff = [a - b for a, b in zip(g, golds[baseline])]
            rate, wins, ties, losses = win_rate(g, golds[baseline])
            row.update({"win_rate": rate, "wins": wins, "ties": ties, "losses": losses,
                        "gold_diff": sum(diff) / len(diff), "gold_diff_ci": list(bootstrap_ci(diff, seed=config.seed))})
        rows.append(row)
    examples = [{"prompt": questions[i], **{name: {"response": answers[name][i], "gold": round(golds[name][i], 3)}
                                            for name in config.models}}
                for i in range(min(config.examples, len(prompts)))]
    result = {"prompts": len(prompts), "baseline": baseline, "rows": rows, "examples": examples,
              "seconds": round(time.time() - started, 1)}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_jsonl(out / "samples.jsonl", ({"prompt": q, **{n: answers[n][i] for n in config.models},
                                          **{f"{n}_gold": golds[n][i] for n in config.models}}
                                         for i, q in enumerate(questions)))
    say(format_result(result, names))
    return result


def format_result(result: dict, names: dict[str, str] | None = None) -> str:
    names = names or {}
    lines = [f"Held-out evaluation on {result['prompts']} prompts (gold = simulated annotator without noise, "
             f"95% bootstrap intervals; baseline: {names.get(result['baseline'], result['baseline'])})", ""]
    table_rows = []
    for r in result["rows"]:
        table_rows.append({
            "model": names.get(r["model"], r["model"]),
            "gold score [95% CI]": f"{r['gold']:.3f} [{r['gold_ci'][0]:.3f}, {r['gold_ci'][1]:.3f}]",
            "gold Δ vs baseline [95% CI]": (f"{r['gold_diff']:+.3f} [{r['gold_diff_ci'][0]:+.3f}, {r['gold_diff_ci'][1]:+.3f}]"
                                            if "gold_diff" in r else "-"),
            "gold win rate": f"{r['win_rate']:.1%} ({r['wins']}W {r['ties']}T {r['losses']}L)" if "win_rate" in r else "-",
            "KL to ref": f"{r['kl_to_reference']:.2f}",
            "length (tokens)": f"{r['length_tokens']:.1f}",
            "ended": f"{r['ended']:.0%}",
        })
    lines.append(table(table_rows))
    for ex in result["examples"]:
        lines += ["", f"Prompt: {ex['prompt']}"]
        for key, value in ex.items():
            if key != "prompt":
                lines.append(f"  [{names.get(key, key)}] (gold {value['gold']:.3f}) {value['response']}")
    return "\n".join(lines)
