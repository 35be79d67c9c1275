"""AI labels: a judge chooses between two responses → preference pairs in the human-label format (RLAIF).

What: every two distinct responses of a prompt (a candidates file as `rlhf pairs --annotator none` writes it, or
the pairs of a preference file, relabelled) go to a judge from `rlhf.judges` (a local model, an OpenAI-compatible
endpoint, the reward model or the simulated annotator). Each pair it decides becomes `{prompt, chosen, rejected}`
with the label's confidence, which `rlhf reward` and `rlhf dpo` read like human labels; a pair it leaves without a
label (timeout, server error, malformed JSON, an answer naming neither response, a tie) is written aside with the
reason and counted. The report gives those counts, the judge's position bias (judges that read both orders) and,
given human labels of the same pairs, the judge's agreement with them.
Papers: Lee et al. 2023 (RLAIF); Bai et al. 2022 (Constitutional AI: AI preference labels).
Our deviations: a tie (p = 0.5 exactly, e.g. an endpoint judge whose two orders disagree outright) is no label,
not a coin toss; pairs are matched to human labels by prompt and the unordered pair of responses.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf import config as cfg
from rlhf.annotate.candidates import check_responses, pair_key
from rlhf.data import (
    FORMATS,
    DataError,
    no_preference,
    parse_preference,
    parse_prompt,
    prompt_for_output,
    read_preferences,
    read_records,
    resolve_data_path,
    write_jsonl,
)
from rlhf.hardware import Precision
from rlhf.judges import (
    DEFAULT_QUESTION,
    JUDGE_SPECS,
    Comparison,
    EndpointSettings,
    Judge,
    Judgement,
    make_judge,
    position_bias,
    preference_rows,
)
from rlhf.metrics import bootstrap_ci
from rlhf.tracking import say, seed_everything


@dataclass
class Config:
    judge: str = cfg.field("simulated", f"who labels: {JUDGE_SPECS}")
    data: str = cfg.field("runs/pairs/candidates.jsonl",
                          "candidates {prompt, responses: [...]}, or preference pairs (prompt, chosen, rejected) to "
                          "relabel")
    out: str = cfg.field("runs/label/prefs.jsonl", "the AI labels: prompt, chosen, rejected, p_chosen, confidence")
    human: str = cfg.field("", "human labels of the same pairs (prompt, chosen, rejected): report the judge's "
                               "agreement")
    question: str = cfg.field(DEFAULT_QUESTION, "what the judge is asked about the two responses")
    max_pairs: int = cfg.field(0, "label only the first N pairs (0 = all)")
    batch_size: int = cfg.field(16, "sequences per forward pass of a local or reward-model judge")
    endpoint: EndpointSettings = cfg.field(EndpointSettings(), "how an endpoint judge talks to its server")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false "
                                        "(judges)")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    seed: int = cfg.field(0, "random seed")


def read_comparisons(path: Path, question: str) -> tuple[list[Comparison], dict[str, int]]:
    """Every two distinct responses of each record → comparisons; pairs with no preference possible are counted."""
    comparisons, skipped = [], {"identical": 0, "empty": 0}
    for record in read_records(path):
        if "responses" in record.data:
            prompt = parse_prompt(record)
            problem = check_responses(record.data["responses"])
            if problem:
                raise DataError(f"{record.where('responses')}: {problem}. Accepted candidates: "
                                '{"prompt": ..., "responses": ["...", "..."]}, or preference pairs: '
                                f"{FORMATS['preferences']}")
            responses = record.data["responses"]
        else:
            prompt, chosen, rejected = parse_preference(record)
            responses = [chosen, rejected]
        for first, second in itertools.combinations(responses, 2):
            reason = no_preference(first, second)
            if reason:
                skipped[reason] += 1
                continue
            comparisons.append(Comparison(prompt, first, second, question))
    return comparisons, skipped


def judge_all(judge: Judge, comparisons: list[Comparison], chunk: int = 64) -> list[Judgement]:
    """The judge over every comparison, a chunk at a time, with a progress bar."""
    from tqdm.auto import tqdm

    judgements: list[Judgement] = []
    for start in tqdm(range(0, len(comparisons), chunk), desc="judging", unit="chunk", leave=False):
        judgements += judge.compare(comparisons[start:start + chunk])
    return judgements


def agreement(rows: list[dict], human_path: str) -> dict:
    """Share of the judge's labels that match the human label of the same pair, with a 95% bootstrap interval."""
    human = {}
    for prompt, chosen, rejected in read_preferences(resolve_data_path(human_path)):
        human[pair_key(prompt_for_output(prompt), chosen, rejected)] = chosen
    same = [float(r["chosen"] == human[key]) for r in rows
            if (key := pair_key(r["prompt"], r["chosen"], r["rejected"])) in human]
    low, high = bootstrap_ci(same)
    return {"human_pairs": len(human), "labelled_by_both": len(same),
            "agreement": sum(same) / len(same) if same else float("nan"), "agreement_ci": [low, high]}


def main(config: Config) -> dict:
    seed_everything(config.seed)
    started = time.time()
    out = Path(config.out)

    # 1. the pairs to label
    comparisons, skipped = read_comparisons(resolve_data_path(config.data), config.question)
    if config.max_pairs:
        comparisons = comparisons[: config.max_pairs]
    judge = make_judge(config.judge, device=config.device, bf16=config.bf16, seed=config.seed,
                       batch_size=config.batch_size, endpoint=config.endpoint)
    say(f"[label] {len(comparisons)} pairs from {config.data} for the judge {judge.name} "
        f"(skipped {skipped['identical']} identical, {skipped['empty']} with an empty response)")

    # 2. the judge's probability that the first response is better, or no label and why
    judgements = judge_all(judge, comparisons)

    # 3. preferences in the human-label format; the pairs without a label written aside with their reason
    rows, missing, no_label = preference_rows(comparisons, judgements, judge.name)
    write_jsonl(out, rows)
    missing_path = write_jsonl(out.with_name(f"{out.stem}_nolabel.jsonl"), missing)

    # 4. the report: counts, position bias, agreement with people
    summary = {"stage": "label", "judge": judge.name, "pairs": len(comparisons), "labelled": len(rows),
               "no_label": no_label, "skipped": skipped, "position_bias": position_bias(judgements),
               "mean_confidence": sum(r["confidence"] for r in rows) / len(rows) if rows else float("nan"),
               "file": str(out), "no_label_file": str(missing_path)}
    if hasattr(judge, "stats"):
        summary["endpoint"] = vars(judge.stats)
    if config.human:
        summary["human"] = agreement(rows, config.human)
    summary["seconds"] = round(time.time() - started, 1)
    out.with_name(f"{out.stem}_report.json").write_text(json.dumps(summary, indent=2))
    say(format_report(summary))
    return summary


def format_report(summary: dict) -> str:
    missing = ", ".join(f"{n} {reason}" for reason, n in sorted(summary["no_label"].items())) or "none"
    lines = [f"[label] {summary['judge']}: {summary['labelled']} of {summary['pairs']} pairs labelled "
             f"(mean confidence {summary['mean_confidence']:.2f}); no label: {missing}"]
    bias = summary["position_bias"]
    if bias["pairs"]:
        lines.append(f"[label] position bias {bias['bias']:+.3f} (0 = none, +0.5 = always the response shown first); "
                     f"both orders agree on {bias['consistency']:.0%} of {bias['pairs']} pairs")
    if "endpoint" in summary:
        e = summary["endpoint"]
        lines.append(f"[label] endpoint: {e['requests']} requests, {e['retries']} retries, "
                     f"{e['cached']} from the cache")
    if "human" in summary:
        h = summary["human"]
        lines.append(f"[label] agreement with human labels {h['agreement']:.3f} [{h['agreement_ci'][0]:.3f}, "
                     f"{h['agreement_ci'][1]:.3f}] on {h['labelled_by_both']} pairs labelled by both")
    lines.append(f"[label] wrote {summary['file']} and {summary['no_label_file']} ({summary['seconds']} s)")
    return "\n".join(lines)
