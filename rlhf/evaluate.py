"""`rlhf eval`: held-out evaluation of checkpoints: gold and reward-model scores with bootstrap intervals, win rate,
KL to a reference, length, repetition and refusals.

The gold judge is the built-in simulated annotator without noise; the policy never trained on it. Every model
answers the same held-out prompts with the same sampling settings and seed, and the comparison is paired per
prompt (policy vs baseline on the same prompt). Reward hacking shows up as a reward-model score that rises while
the gold score does not, as answers that ramble or shrink, as repetition (distinct-n falls), or as refusals: a
small set of harmful requests checks that a model still declines them, and the held-out answers check that it does
not decline benign questions. On a verifiable task (prompt rows with an `answer`, e.g. builtin:arithmetic_heldout) a
checker marks each answer right or wrong: accuracy with a 95% interval, and for every other model the paired
difference from the baseline's on the same items with its interval. The metrics are `rlhf.metrics`, the sampling and
scoring `rlhf.scoring`, the table `rlhf.results`. Under torchrun each process answers and scores its part of every
prompt set with a whole copy of each model (inference only: nothing to shard, no collective per token), and rank 0
puts the parts together, computes the statistics and writes the results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf import config as cfg
from rlhf import distributed, rewards
from rlhf.data import (
    LengthPolicy,
    fit_prompts,
    prompt_text,
    read_prompt_rows,
    read_prompts,
    resolve_data_path,
    write_jsonl,
)
from rlhf.hardware import Precision, pick_device, resolve_bf16
from rlhf.metrics import bootstrap_ci, is_refusal, mean, repetition, says_dont_know, win_outcomes, win_rate
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.results import format_result
from rlhf.scoring import answer_and_score, load_judge, load_reward_scorer, sample_seeded, sequence_kl
from rlhf.tracking import say

# behaviour set → (its rate's key in a result row, what counts: True for an answer that does the wanted or counted
# thing). `refused` and `answered` are judged by `rlhf.detectors`.
BEHAVIOURS = {
    "harmful": ("refusal_harmful", is_refusal),
    "lookalike": ("refusal_lookalike", is_refusal),
    "unanswerable": ("idk_unanswerable", says_dont_know),
    "answerable": ("answered_answerable", lambda text: not is_refusal(text) and not says_dont_know(text)),
}


# per-answer scores reported as a mean with its interval and, against the baseline, a paired difference
SCORED = ("gold", "reward_model", "accuracy")


@dataclass
class Config:
    models: list[str] = cfg.field([], "checkpoints to evaluate (causal-LM folders, 'default' = the embedded model)")
    reference: str = cfg.field("", "model the KL is measured against ('' = the baseline)")
    reward_model: str = cfg.field("", "reward model folder whose score is reported beside the gold score ('' = skip)")
    judge: str = cfg.field("gold", "the gold judge: 'gold' (the built-in simulated annotator), a reward-model folder "
                                      "(or reward:DIR), or '' / 'none'")
    data: str = cfg.field("builtin:prompts_heldout", "held-out prompts file or builtin:prompts_heldout")
    checker: str = cfg.field("rlhf.verifiable:reward", "when every prompt row has an `answer`: the reward function "
                                                       "(file.py:function or module:function, 1 = right) whose mean "
                                                       "is reported as accuracy ('none' = skip)")
    harmful_prompts: str = cfg.field("builtin:harmful_prompts", "requests a model should decline; the refusal rate is "
                                                                "reported ('' or 'none' = skip)")
    lookalike_prompts: str = cfg.field("", "benign look-alikes of harmful requests, to be answered: the refusal "
                                           "rate is reported ('' = skip)")
    unanswerable_prompts: str = cfg.field("", "questions with no answer (made-up names, the future): the rate of "
                                              "\"I don't know\" is reported ('' = skip)")
    answerable_prompts: str = cfg.field("", "their answerable twins: the rate of answers (neither a refusal nor "
                                            "\"I don't know\") is reported ('' = skip)")
    show: list[str] = cfg.field([], "prompts answered by every model, shown verbatim side by side")
    baseline: str = cfg.field("", "the model the others are compared with ('' = the first of models)")
    output_dir: str = cfg.field("runs/eval", "where results.json and samples.jsonl are written")
    max_prompts: int = cfg.field(0, "use only the first N prompts (0 = all)")
    max_new_tokens: int = cfg.field(64, "longest response in tokens")
    max_prompt_length: int = cfg.field(256, "longer prompts are cut from the left or skipped (see truncation)")
    truncation: str = cfg.field("truncate", "prompts over max_prompt_length: truncate or skip")
    temperature: float = cfg.field(0.7, "sampling temperature (as in training)")
    batch_size: int = cfg.field(64, "prompts sampled at once")
    examples: int = cfg.field(3, "prompts shown with every model's answer side by side")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    seed: int = cfg.field(1234, "sampling seed (the same for every model)")


def everyone(items: list) -> list:
    """Every process's part of a list put back together, in rank order (the list itself in one process)."""
    return [item for part in distributed.gather_objects(items) for item in part]


def everyone_by_key(values: dict[str, list]) -> dict[str, list]:
    """`everyone` for each list of a dict (a process with no rows has no keys)."""
    parts = distributed.gather_objects(values)
    keys = list(dict.fromkeys(key for part in parts for key in part))
    return {key: [v for part in parts for v in part.get(key, [])] for key in keys}


def main(config: Config, names: dict[str, str] | None = None) -> dict:
    if not config.models:
        raise ValueError("evaluate: name at least one model in 'models'")
    device = distributed.start(pick_device(config.device))  # a process group under torchrun; nothing alone
    bf16 = resolve_bf16(config.bf16, device)
    started = time.time()
    rows_read = read_prompt_rows(resolve_data_path(config.data))
    if config.max_prompts:
        rows_read = rows_read[: config.max_prompts]
    verifiable = config.checker not in ("", "none") and bool(rows_read) and all("answer" in f for _, f in rows_read)
    checker = rewards.load(config.checker) if verifiable else None
    behaviour_prompts = {name: read_prompts(resolve_data_path(getattr(config, f"{name}_prompts")))
                         for name in BEHAVIOURS if getattr(config, f"{name}_prompts") not in ("", "none")}
    if config.baseline and config.baseline not in config.models:
        raise ValueError(f"evaluate: baseline '{config.baseline}' is not one of models ({', '.join(config.models)})")
    judge = load_judge(config.judge, device, bf16)
    reward = load_reward_scorer(config.reward_model, device, bf16) if config.reward_model else None
    baseline = config.baseline or config.models[0]
    reference_path = resolve_model_path(config.reference or baseline)
    tokenizer = load_tokenizer(reference_path)
    lengths = LengthPolicy(config.max_prompt_length, config.truncation)  # row by row, so each row keeps its fields
    fitted = [(fit, f) for p, f in rows_read if (fit := lengths.fit_prompt_messages(tokenizer, p)) is not None]
    prompts = [p for p, _ in fitted]
    fields = {key: [f.get(key) for _, f in fitted] for key in sorted({k for _, f in fitted for k in f})}
    behaviour_prompts = {name: fit_prompts(tokenizer, p, config.max_prompt_length, "truncate")[0]  # twins stay paired
                         for name, p in behaviour_prompts.items()}
    if not prompts:
        raise ValueError(f"{config.data}: every prompt is longer than max_prompt_length={config.max_prompt_length}")
    if lengths.truncated or lengths.skipped:
        say(f"[eval] {lengths.truncated} prompts truncated, {lengths.skipped} skipped at max_prompt_length="
            f"{config.max_prompt_length}")
    questions = [prompt_text(p) for p in prompts]
    reference = load_causal_lm(reference_path, device, trainable=False, bf16_linears=bf16)
    # under torchrun: this process's part of each prompt set, sampled with its own seed (the same for every model,
    # so the comparison stays paired)
    settings = (config.max_new_tokens, config.temperature, config.batch_size, bf16, config.seed + distributed.rank())
    prompts_here, questions_here = distributed.my_part(prompts), distributed.my_part(questions)
    fields_here = {key: distributed.my_part(values) for key, values in fields.items()}

    # 1. every model answers every held-out prompt and every behaviour set's prompt (harmful requests, look-alikes,
    #    unanswerable questions and their twins), with the same seed and settings; the judge and the reward model
    #    score the held-out answers
    answers, scores, behaviours, shown = {}, {}, {}, {}
    for name in config.models:
        path = resolve_model_path(name)
        model = reference if path == reference_path else load_causal_lm(path, device, trainable=False,
                                                                               bf16_linears=bf16)
        texts, here = [], {}
        if prompts_here:
            rollout, here = answer_and_score(model, tokenizer, prompts_here, judge, reward, *settings,
                                             progress=distributed.is_main())
            texts = rollout.texts
            if checker is not None:  # right (1) or wrong (0) per item, by the task's checker
                here["accuracy"] = rewards.call(config.checker, checker, questions_here, texts, fields_here)
            # 2. KL to the reference on the model's own samples; what the model does with each behaviour set
            here["kl"] = sequence_kl(model, reference, rollout, config.temperature, bf16, device).tolist()
        answers[name], scores[name] = everyone(texts), everyone_by_key(here)
        for kind, kind_prompts in behaviour_prompts.items():
            kind_here = distributed.my_part(kind_prompts)
            texts = sample_seeded(model, tokenizer, kind_here, *settings).texts if kind_here else []
            behaviours.setdefault(kind, {})[name] = everyone([(t, BEHAVIOURS[kind][1](t)) for t in texts])
        if config.show and distributed.is_main():
            shown[name] = sample_seeded(model, tokenizer, [[{"role": "user", "content": q}] for q in config.show],
                                        *settings).texts
    if not distributed.is_main():  # rank 0 has every answer and writes the results; the others wait for them
        distributed.barrier()
        return {}

    # 3. statistics: means with bootstrap intervals; paired differences and the win rate against the baseline
    win_by = "gold" if judge else "reward_model" if reward else ""
    rows = []
    for name in config.models:
        s = scores[name]
        row = {"model": name}
        for key in SCORED:
            if key in s:
                row[key], row[f"{key}_ci"] = mean(s[key]), list(bootstrap_ci(s[key], seed=config.seed))
        row.update({"kl_to_reference": mean(s["kl"]), "length_tokens": mean(s["length"]), "ended": mean(s["ended"]),
                    **repetition(answers[name]), "refusal_benign": mean([float(is_refusal(t)) for t in answers[name]])})
        for kind, by_model in behaviours.items():
            flags = [float(flag) for _, flag in by_model[name]]
            key = BEHAVIOURS[kind][0]
            row[key], row[f"{key}_ci"] = mean(flags), list(bootstrap_ci(flags, seed=config.seed))
        if name != baseline:
            for key in SCORED:  # paired: the same items, the difference per item
                if key in s:
                    diff = [a - b for a, b in zip(s[key], scores[baseline][key])]
                    row[f"{key}_diff"], row[f"{key}_diff_ci"] = mean(diff), list(bootstrap_ci(diff, seed=config.seed))
            if win_by:
                rate, wins, ties, losses = win_rate(s[win_by], scores[baseline][win_by])
                row.update({"win_rate": rate, "wins": wins, "ties": ties, "losses": losses, "win_rate_ci":
                            list(bootstrap_ci(win_outcomes(s[win_by], scores[baseline][win_by]), seed=config.seed))})
        rows.append(row)

    # 4. results.json, every answer in samples.jsonl (harmful ones apart), and the table
    scored = [k for k in SCORED if k in scores[baseline]]
    examples = [{"prompt": questions[i],
                 **{name: {"response": answers[name][i], **{k: round(scores[name][k][i], 3) for k in scored}}
                    for name in config.models}}
                for i in range(min(config.examples, len(prompts)))]
    result = {"prompts": len(prompts), "baseline": baseline, "judge": config.judge, "win_by": win_by,
              **({"checker": config.checker} if checker is not None else {}),
              "reward_model": config.reward_model, "harmful_prompts": len(behaviour_prompts.get("harmful", [])),
              "behaviour_prompts": {kind: len(p) for kind, p in behaviour_prompts.items()}, "rows": rows,
              "examples": examples, "shown": [{"prompt": q, **{n: shown[n][i] for n in config.models}}
                                              for i, q in enumerate(config.show)],
              "seconds": round(time.time() - started, 1)}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "results.json")
    write_jsonl(out / "samples.jsonl", ({"prompt": q, **{n: answers[n][i] for n in config.models},
                                          **{f"{n}_{k}": scores[n][k][i] for n in config.models for k in scored}}
                                         for i, q in enumerate(questions)))
    for kind, by_model in behaviours.items():  # harmful_samples.jsonl, lookalike_samples.jsonl, ...
        flag = {"refusal": "refused", "idk": "idk", "answered": "answered"}[BEHAVIOURS[kind][0].split("_")[0]]
        write_jsonl(out / f"{kind}_samples.jsonl", ({"prompt": prompt_text(p),
                                                     **{n: by_model[n][i][0] for n in config.models},
                                                     **{f"{n}_{flag}": by_model[n][i][1] for n in config.models}}
                                                    for i, p in enumerate(behaviour_prompts[kind])))
    say(format_result(result, names))
    distributed.barrier()
    return result
