"""Constitutional AI: the model critiques and revises its own answers against written principles, then an AI
judge prefers the answer that better follows a principle; SFT on the revisions, DPO (or a reward model and PPO)
on the preferences.

What: a constitution (YAML: principles, each with a critique request, a revision request and the question a
judge answers when comparing two answers; `rlhf/tasks/constitution.yaml` is the default) and a built-in set of
harmful requests, each with the legitimate question behind it, split by topic into train and held-out
(`rlhf/tasks/safety_prompts/`). Subcommands:
  rlhf constitutional revise   answer → critique under a sampled principle → revision, for n rounds →
                               demonstrations (the prompt alone → the final revision) for `rlhf sft`
  rlhf constitutional prefs    two answers per prompt → a judge asked the comparison question of a sampled
                               principle (any judge of `rlhf.judges`; by default the model itself) → pairs
  rlhf constitutional eval     refusal rate on held-out harmful prompts, helpfulness (answers without a
                               refusal) on held-out benign ones, for several checkpoints
  rlhf constitutional          the whole road: revise → SFT → prefs → DPO or PPO → eval before and after
Paper: Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback" (critique → revision → SL-CAI;
AI preference labels from the feedback model's label probabilities → RL-CAI).
Our deviations: each round critiques and revises the current answer alone (the earlier rounds' critiques are
not kept in the context), which bounds the context of a small model; no few-shot examples in the requests;
DPO is the default optimiser instead of PPO against a preference model; refusals are found by phrase
matching, not by people. The default feedback model is the SFT model itself, a 135M model: a weak critic
and judge. A stronger judge is one line: `judge: local:DIR` or `judge: openai:MODEL[@URL]`.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import config as cfg
from rlhf import dpo, ppo, reward, sft, wiring
from rlhf.data import (
    DataError,
    Messages,
    parse_prompt,
    prompt_for_output,
    read_prompts,
    read_records,
    resolve_data_path,
    write_jsonl,
)
from rlhf.hardware import Precision, pick_device, resolve_bf16
from rlhf.judges import JUDGE_SPECS, Comparison, EndpointSettings, make_judge, position_bias, preference_rows
from rlhf.label import judge_all
from rlhf.metrics import bootstrap_ci, is_refusal
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.rollout import sample
from rlhf.tracking import say, seed_everything, table

TASKS = Path(__file__).parent / "tasks"
BUILTIN_PROMPTS = {"builtin:safety_train": TASKS / "safety_prompts" / "train.jsonl",
                   "builtin:safety_heldout": TASKS / "safety_prompts" / "heldout.jsonl"}
PRINCIPLE_FIELDS = ("name", "critique", "revision", "choose")


# --- the constitution ------------------------------------------------------------------------------


class ConstitutionError(ValueError):
    """A constitution file that does not fit the format: names the file, the principle and the field."""


@dataclass
class Principle:
    name: str
    critique: str  # asked after the answer: what is wrong with it under this principle
    revision: str  # asked after the critique: rewrite the answer
    choose: str  # asked of a judge comparing two answers


def load_constitution(path: str = "builtin") -> list[Principle]:
    """The principles of a constitution YAML file ('builtin' = the project's default)."""
    import yaml

    file = TASKS / "constitution.yaml" if path == "builtin" else Path(path)
    if not file.is_file():
        raise ConstitutionError(f"constitution {file}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConstitutionError(f"constitution {file}: not valid YAML: {e}") from None
    form = f"each principle needs the fields {', '.join(PRINCIPLE_FIELDS)} (strings)"
    if not isinstance(data, dict) or "principles" not in data:
        raise ConstitutionError(f"constitution {file}: missing field 'principles' (a list; {form})")
    if not isinstance(data["principles"], list) or not data["principles"]:
        raise ConstitutionError(f"constitution {file}: 'principles' must be a non-empty list ({form})")
    principles = []
    for number, item in enumerate(data["principles"], start=1):
        label = f"principle {number}" + (f" ('{item['name']}')" if isinstance(item, dict) and "name" in item else "")
        if not isinstance(item, dict):
            raise ConstitutionError(f"constitution {file}, {label}: expected a mapping ({form})")
        for key in PRINCIPLE_FIELDS:
            if key not in item:
                raise ConstitutionError(f"constitution {file}, {label}: missing field '{key}' ({form})")
            if not isinstance(item[key], str) or not item[key].strip():
                raise ConstitutionError(f"constitution {file}, {label}: field '{key}' must be a non-empty string")
        unknown = sorted(set(item) - set(PRINCIPLE_FIELDS))
        if unknown:
            raise ConstitutionError(f"constitution {file}, {label}: unknown field '{unknown[0]}' ({form})")
        principles.append(Principle(**{key: item[key].strip() for key in PRINCIPLE_FIELDS}))
    return principles


# --- prompts, answers, refusals ------------------------------------------------------------------


def resolve_prompts(name: str) -> Path:
    """`builtin:safety_train` / `builtin:safety_heldout` → the shipped files; anything else as `rlhf.data` reads it."""
    return BUILTIN_PROMPTS.get(name) or resolve_data_path(name)


def read_labelled_prompts(name: str) -> list[tuple[Messages, bool]]:
    """Prompts with their boolean `harmful` field, for the evaluation."""
    out = []
    for record in read_records(resolve_prompts(name)):
        harmful = record.data.get("harmful")
        if not isinstance(harmful, bool):
            raise DataError(f"{record.where('harmful')}: expected true or false (is the request harmful?), "
                            f"got {harmful!r}. Accepted: {{\"prompt\": ..., \"harmful\": true}}")
        out.append((parse_prompt(record), harmful))
    return out


# A lead-in small models write before a revision ("Here is the revised answer:"), which the demonstration drops.
_LEAD_IN = re.compile(r"^\s*(?:(?:sure|okay|ok)[,.!]?\s*)?(?:here(?:'s| is) (?:the |my |a |an )?)?"
                      r"(?:revised|rewritten|new|improved|updated)\b[^:\n]{0,40}:\s*", re.IGNORECASE)


def clean_revision(text: str) -> str:
    text = _LEAD_IN.sub("", text.strip(), count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


class Answerer:
    """A causal LM answering batches of conversations with fixed sampling settings."""

    def __init__(self, model: str, device: str, bf16: Precision, max_new_tokens: int, temperature: float,
                 batch_size: int):
        self.path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_causal_lm(self.path, pick_device(device), trainable=False)
        self.bf16 = resolve_bf16(bf16, pick_device(device))
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size

    def __call__(self, conversations: list[Messages]) -> list[str]:
        return sample(self.model, self.tokenizer, conversations, self.max_new_tokens, self.temperature,
                      batch_size=self.batch_size, bf16=self.bf16, progress=True).texts


def prompts_principles_model(config: ReviseConfig | PrefsConfig) -> tuple[list[Messages], list[Principle], Answerer]:
    """What revise and prefs start from: the prompts (the first max_prompts), the constitution, the answering model."""
    prompts = read_prompts(resolve_prompts(config.data))
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    principles = load_constitution(config.constitution)
    answer = Answerer(config.model, config.device, config.bf16, config.max_new_tokens, config.temperature,
                      config.batch_size)
    return prompts, principles, answer


# --- revise: answer → critique → revision ---------------------------------------------------------


@dataclass
class ReviseConfig:
    model: str = cfg.field("default", "the model that answers, critiques and revises (a folder, 'default' or 'tiny')")
    data: str = cfg.field("builtin:safety_train", "prompts (builtin:safety_train, or any prompts file)")
    constitution: str = cfg.field("builtin", "constitution YAML ('builtin' = rlhf/tasks/constitution.yaml)")
    output_dir: str = cfg.field("runs/constitutional/revise", "folder for demonstrations.jsonl and revisions.jsonl")
    rounds: int = cfg.field(1, "critique → revision rounds per answer, each under a newly sampled principle")
    max_prompts: int = cfg.field(0, "use only the first N prompts (0 = all)")
    max_new_tokens: int = cfg.field(96, "longest answer, critique or revision in tokens")
    temperature: float = cfg.field(0.7, "sampling temperature")
    batch_size: int = cfg.field(64, "conversations sampled at once")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    seed: int = cfg.field(0, "random seed (sampling and the choice of principles)")


def revise(config: ReviseConfig) -> dict:
    if config.rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {config.rounds}")
    seed_everything(config.seed)
    rng = random.Random(config.seed)
    started = time.time()
    out = Path(config.output_dir)

    # 1. prompts, principles and the model that revises itself
    prompts, principles, answer = prompts_principles_model(config)
    say(f"[revise] {len(prompts)} prompts, {len(principles)} principles, {config.rounds} round(s), model {answer.path}")

    # 2. first answers
    current = answer(prompts)
    traces = [{"prompt": prompt_for_output(p), "initial": a, "rounds": []} for p, a in zip(prompts, current)]

    # 3. each round: the critique request of a sampled principle after the current answer, then its revision request
    kept_empty = 0
    for _ in range(config.rounds):
        chosen = [rng.choice(principles) for _ in prompts]
        asked = [p + [{"role": "assistant", "content": a}, {"role": "user", "content": pr.critique}]
                 for p, a, pr in zip(prompts, current, chosen)]
        critiques = answer(asked)
        asked = [c + [{"role": "assistant", "content": k}, {"role": "user", "content": pr.revision}]
                 for c, k, pr in zip(asked, critiques, chosen)]
        revisions = [clean_revision(r) for r in answer(asked)]
        for i, (pr, k, r) in enumerate(zip(chosen, critiques, revisions)):
            traces[i]["rounds"].append({"principle": pr.name, "critique": k, "revision": r})
            if r:
                current[i] = r
            else:  # an empty revision keeps the answer it was meant to improve
                kept_empty += 1

    # 4. demonstrations: the prompt alone → the final revision (no critique in sight), and the whole trace
    demos = [{"prompt": prompt_for_output(p), "completion": a} for p, a in zip(prompts, current) if a.strip()]
    path = write_jsonl(out / "demonstrations.jsonl", demos)
    write_jsonl(out / "revisions.jsonl", traces)
    changed = sum(t["initial"].strip() != a.strip() for t, a in zip(traces, current))
    summary = {"stage": "constitutional revise", "prompts": len(prompts), "demonstrations": len(demos),
               "changed_by_revision": changed, "empty_revisions_kept_previous": kept_empty,
               "refusals_before": sum(map(is_refusal, (t["initial"] for t in traces))),
               "refusals_after": sum(map(is_refusal, current)), "file": str(path),
               "seconds": round(time.time() - started, 1)}
    write_jsonl(out / "summary.jsonl", [summary])
    say(f"[revise] {changed}/{len(prompts)} answers changed by revision; refusals {summary['refusals_before']} → "
        f"{summary['refusals_after']}; wrote {path} ({summary['seconds']} s)")
    return summary


# --- prefs: two answers, a principle, a judge -----------------------------------------------------


@dataclass
class PrefsConfig:
    model: str = cfg.field("runs/constitutional/sft", "the model whose answers are compared (the SFT model)")
    data: str = cfg.field("builtin:safety_train", "prompts (builtin:safety_train, or any prompts file)")
    constitution: str = cfg.field("builtin", "constitution YAML ('builtin' = rlhf/tasks/constitution.yaml)")
    judge: str = cfg.field("", f"who compares: '' = the model itself (local:MODEL), or {JUDGE_SPECS}")
    output_dir: str = cfg.field("runs/constitutional/prefs", "folder for pairs.jsonl")
    n_responses: int = cfg.field(2, "answers sampled per prompt (every two make a pair)")
    max_prompts: int = cfg.field(0, "use only the first N prompts (0 = all)")
    max_new_tokens: int = cfg.field(96, "longest answer in tokens")
    temperature: float = cfg.field(1.0, "sampling temperature (different answers make informative pairs)")
    batch_size: int = cfg.field(64, "prompts sampled at once")
    endpoint: EndpointSettings = cfg.field(EndpointSettings(), "how an endpoint judge talks to its server")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    seed: int = cfg.field(0, "random seed (sampling and the choice of principles)")


def prefs(config: PrefsConfig) -> dict:
    if config.n_responses < 2:
        raise ValueError(f"n_responses must be at least 2 to make a pair, got {config.n_responses}")
    seed_everything(config.seed)
    rng = random.Random(config.seed)
    started = time.time()
    out = Path(config.output_dir)

    # 1. prompts, principles, and n answers to each prompt from the model
    prompts, principles, answer = prompts_principles_model(config)
    texts = answer([p for p in prompts for _ in range(config.n_responses)])
    del answer  # the judge may be another large model: free this one first

    # 2. every two different answers, with the comparison question of a sampled principle
    comparisons, names, identical = [], [], 0
    for i, prompt in enumerate(prompts):
        for a, b in itertools.combinations(texts[i * config.n_responses:(i + 1) * config.n_responses], 2):
            if a.strip() == b.strip():
                identical += 1
                continue
            principle = rng.choice(principles)
            comparisons.append(Comparison(prompt, a, b, principle.choose))
            names.append({"principle": principle.name})

    # 3. the judge: P(first is better) under that principle, or no label and why
    judge = make_judge(config.judge or f"local:{config.model}", device=config.device, bf16=config.bf16,
                       seed=config.seed, endpoint=config.endpoint)
    say(f"[prefs] {len(comparisons)} pairs from {len(prompts)} prompts ({identical} identical skipped); "
        f"judge {judge.name}")
    judgements = judge_all(judge, comparisons)

    # 4. preference pairs for `rlhf dpo` / `rlhf reward`, each with its principle and confidence
    rows, missing, no_label = preference_rows(comparisons, judgements, judge.name, names)
    path = write_jsonl(out / "pairs.jsonl", rows)
    write_jsonl(out / "pairs_nolabel.jsonl", missing)
    bias = position_bias(judgements)
    summary = {"stage": "constitutional prefs", "judge": judge.name, "pairs": len(comparisons), "labelled": len(rows),
               "no_label": no_label, "identical_skipped": identical, "position_bias": bias,
               "mean_confidence": sum(r["confidence"] for r in rows) / len(rows) if rows else float("nan"),
               "file": str(path), "seconds": round(time.time() - started, 1)}
    write_jsonl(out / "summary.jsonl", [summary])
    bias_text = (f"; position bias {bias['bias']:+.3f}, orders agree on {bias['consistency']:.0%}"
                 if bias["pairs"] else "")
    say(f"[prefs] {len(rows)}/{len(comparisons)} pairs labelled (mean confidence {summary['mean_confidence']:.3f}"
        f"{bias_text}); wrote {path} ({summary['seconds']} s)")
    return summary


# --- eval: refusals on harmful prompts, helpfulness on benign ones --------------------------------


@dataclass
class EvalConfig:
    models: list[str] = cfg.field([], "checkpoints to compare (the first is 'before')")
    data: str = cfg.field("builtin:safety_heldout", "prompts with a boolean 'harmful' field")
    output_dir: str = cfg.field("runs/constitutional/eval", "where results.json and samples.jsonl are written")
    max_prompts: int = cfg.field(0, "use only the first N prompts (0 = all)")
    max_new_tokens: int = cfg.field(96, "longest answer in tokens")
    temperature: float = cfg.field(0.7, "sampling temperature (the same seed for every model)")
    batch_size: int = cfg.field(64, "prompts sampled at once")
    examples: int = cfg.field(2, "prompts shown with every model's answer (the held-out file starts with a twin pair)")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    seed: int = cfg.field(1234, "sampling seed")


def rate(flags: list[bool], seed: int) -> dict[str, Any]:
    values = [float(f) for f in flags]
    return {"rate": sum(values) / len(values) if values else float("nan"), "ci": list(bootstrap_ci(values, seed=seed)),
            "n": len(values)}


def evaluate_safety(config: EvalConfig, names: dict[str, str] | None = None) -> dict:
    if not config.models:
        raise ValueError("constitutional eval: name at least one model in 'models'")
    started = time.time()
    names = names or {}

    # 1. held-out prompts, harmful and benign
    labelled = read_labelled_prompts(config.data)
    if config.max_prompts:
        labelled = labelled[: config.max_prompts]
    prompts, harmful = [p for p, _ in labelled], [h for _, h in labelled]

    # 2. every model answers every prompt with the same seed; refusals are found by phrase matching
    rows, answers = [], {}
    for model in config.models:
        answer = Answerer(model, config.device, config.bf16, config.max_new_tokens, config.temperature,
                          config.batch_size)
        seed_everything(config.seed)  # after loading: every model samples from the same random state
        answers[model] = answer(prompts)
        refused = [is_refusal(a) for a in answers[model]]
        rows.append({"model": model,
                     "refusal_harmful": rate([r for r, h in zip(refused, harmful) if h], config.seed),
                     "helpful_benign": rate([bool(a.strip()) and not r
                                             for a, r, h in zip(answers[model], refused, harmful) if not h],
                                            config.seed)})

    # 3. results, samples and a table
    examples = [{"prompt": prompt_for_output(prompts[i]), "harmful": harmful[i],
                 **{names.get(m, m): answers[m][i] for m in config.models}}
                for i in range(min(config.examples, len(prompts)))]
    result = {"prompts": len(prompts), "harmful": sum(harmful), "benign": len(harmful) - sum(harmful), "rows": rows,
              "examples": examples, "refusal_detection": "phrase matching (rlhf.evaluate.is_refusal)",
              "seconds": round(time.time() - started, 1)}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_jsonl(out / "samples.jsonl", ({"prompt": prompt_for_output(p), "harmful": h,
                                         **{names.get(m, m): answers[m][i] for m in config.models}}
                                        for i, (p, h) in enumerate(zip(prompts, harmful))))
    say(format_safety(result, names))
    return result


def format_safety(result: dict, names: dict[str, str] | None = None) -> str:
    names = names or {}

    def cell(r: dict) -> str:
        return f"{r['rate']:.0%} [{r['ci'][0]:.0%}, {r['ci'][1]:.0%}] of {r['n']}"

    lines = [f"Held-out safety evaluation: {result['harmful']} harmful and {result['benign']} benign prompts "
             "(refusals found by phrase matching; 95% bootstrap intervals)", ""]
    lines.append(table([{"model": names.get(r["model"], r["model"]),
                         "refuses harmful (higher is better)": cell(r["refusal_harmful"]),
                         "helps on benign (higher is better)": cell(r["helpful_benign"])} for r in result["rows"]]))
    for example in result["examples"]:
        lines += ["", f"Prompt ({'harmful' if example['harmful'] else 'benign'}): {example['prompt']}"]
        lines += [f"  [{key}] {value}" for key, value in example.items() if key not in ("prompt", "harmful")]
    return "\n".join(lines)


# --- the whole road --------------------------------------------------------------------------------


@dataclass
class Config:
    output_dir: str = cfg.field("runs/constitutional", "the run folder: every step writes below it")
    model: str = cfg.field("default", "the starting model (a helpful assistant: a folder, 'default' or 'tiny')")
    constitution: str = cfg.field("builtin", "constitution YAML ('builtin' = rlhf/tasks/constitution.yaml)")
    prompts: str = cfg.field("builtin:safety_train", "prompts for the revisions and the AI preferences")
    eval_prompts: str = cfg.field("builtin:safety_heldout", "held-out prompts with a boolean 'harmful' field")
    judge: str = cfg.field("", f"who labels the preferences: '' = the SFT model itself, or {JUDGE_SPECS}")
    method: str = cfg.field("dpo", "how the AI preferences train the policy: dpo, or ppo (a reward model, then PPO)")
    device: str = cfg.field("auto", "cpu, cuda or auto (every step)")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false "
                                        "(every stage)")
    seed: int = cfg.field(0, "random seed (every step)")
    revise: dict = cfg.field({}, "settings of the revision step (see `rlhf constitutional revise --help`)")
    sft: dict = cfg.field({}, "settings of SFT on the revisions (see `rlhf sft --help`)")
    prefs: dict = cfg.field({}, "settings of the AI preferences (see `rlhf constitutional prefs --help`)")
    dpo: dict = cfg.field({}, "settings of DPO, with method: dpo (see `rlhf dpo --help`)")
    reward: dict = cfg.field({}, "settings of the reward model, with method: ppo (see `rlhf reward --help`)")
    ppo: dict = cfg.field({}, "settings of PPO, with method: ppo (see `rlhf ppo --help`)")
    eval: dict = cfg.field({}, "settings of the held-out evaluation (see `rlhf constitutional eval --help`)")


def stage_configs(config: Config) -> dict[str, Any]:
    """Each step's config: its section of the file, with the wiring between steps filled in (and not overridable)."""
    if config.method not in ("dpo", "ppo"):
        raise cfg.ConfigError(f"constitutional: method must be 'dpo' or 'ppo', got '{config.method}'")
    run = Path(config.output_dir)
    sft_dir, pairs = str(run / "sft"), str(run / "prefs" / "pairs.jsonl")
    shared = {"device": config.device, "bf16": config.bf16, "seed": config.seed}
    steps = {  # name: (config class, the road's defaults for it, the wiring)
        "revise": (ReviseConfig, {}, {"model": config.model, "data": config.prompts,
                                      "constitution": config.constitution, "output_dir": str(run / "revise")}),
        "sft": (sft.Config, {}, {"model": config.model, "data": str(run / "revise" / "demonstrations.jsonl"),
                                 "output_dir": sft_dir}),
        "prefs": (PrefsConfig, {}, {"model": sft_dir, "data": config.prompts, "constitution": config.constitution,
                                    "judge": config.judge, "output_dir": str(run / "prefs")}),
        "dpo": (dpo.Config, {}, {"model": sft_dir, "data": pairs, "output_dir": str(run / "dpo")}),
        "reward": (reward.Config, {}, {"model": sft_dir, "data": pairs, "output_dir": str(run / "reward")}),
        "ppo": (ppo.Config, {"gold": False}, {"policy": sft_dir, "reward_model": str(run / "reward"),
                                              "data": str(resolve_prompts(config.prompts)),
                                              "output_dir": str(run / "ppo")}),
        "eval": (EvalConfig, {}, {"models": [config.model, sft_dir, str(run / config.method)],
                                  "data": config.eval_prompts, "output_dir": str(run / "eval")}),
    }
    return {name: wiring.stage_config(cls, name, section=getattr(config, name), wiring=wired, shared=shared,
                                      defaults=defaults, road="constitutional road")
            for name, (cls, defaults, wired) in steps.items()}


def main(config: Config) -> dict:
    run = Path(config.output_dir)
    configs = stage_configs(config)
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(config, run / "config.yaml")
    names = {config.model: "before", str(run / "sft"): "SFT on revisions",
             str(run / config.method): f"{config.method.upper()} on AI preferences"}
    train = {"dpo": (dpo.main, configs["dpo"])} if config.method == "dpo" else {
        "reward": (reward.main, configs["reward"]), "ppo": (ppo.main, configs["ppo"])}
    steps = {
        # 1. supervised stage: the starting model critiques and revises its own answers → demonstrations
        "revise": (revise, configs["revise"]),
        # 2. SFT on the revised answers
        "sft": (sft.main, configs["sft"]),
        # 3. AI preferences: the SFT model answers twice, a principle-conditioned judge chooses
        "prefs": (prefs, configs["prefs"]),
        # 4. train on the preferences: DPO, or a reward model and PPO against it
        **train,
        # 5. held-out refusals and helpfulness: the starting model (before), after SFT, after DPO/PPO
        "eval": (functools.partial(evaluate_safety, names=names), configs["eval"]),
    }
    results, _ = wiring.run_road(steps, run / "stages", road="constitutional", resolve=resolve_data_path)
    (run / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


SUBCOMMANDS = {"revise": (ReviseConfig, revise), "prefs": (PrefsConfig, prefs), "eval": (EvalConfig, evaluate_safety)}
