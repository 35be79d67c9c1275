"""The before/after table of an evaluation result (`rlhf eval`'s results.json), as the terminal and the HTML
report show it."""

from __future__ import annotations

from rlhf.tracking import table


def _with_ci(row: dict, key: str, signed: bool = False, percent: bool = False) -> str:
    if key not in row:
        return "-"
    spec = ("+" if signed else "") + (".1%" if percent else ".3f")
    low, high = row[f"{key}_ci"]
    return f"{row[key]:{spec}} [{low:{spec}}, {high:{spec}}]"


def result_rows(result: dict, names: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The before/after table as cells (the terminal and the HTML report show the same); results.json of older
    versions reads too, their missing columns as '-'."""
    names = names or {}
    win_by = result.get("win_by", "gold")
    verifiable = any("accuracy" in r for r in result["rows"])
    rows = []
    for r in result["rows"]:
        outcome = f" ({r['wins']}W {r['ties']}T {r['losses']}L)" if "wins" in r else ""
        win = (f"{_with_ci(r, 'win_rate', percent=True)}{outcome}" if "win_rate_ci" in r
               else f"{r['win_rate']:.1%}{outcome}" if "win_rate" in r else "-")
        rows.append({
            "model": names.get(r["model"], r["model"]),
            **({"accuracy [95% CI]": _with_ci(r, "accuracy", percent=True),
                "accuracy Δ vs baseline [95% CI]": _with_ci(r, "accuracy_diff", signed=True, percent=True)}
               if verifiable else {}),
            "gold score [95% CI]": _with_ci(r, "gold"),
            "gold Δ vs baseline [95% CI]": _with_ci(r, "gold_diff", signed=True),
            f"{'RM' if win_by == 'reward_model' else 'gold'} win rate [95% CI]": win,
            "RM score (Δ)": (f"{r['reward_model']:.3f}"
                             + (f" ({r['reward_model_diff']:+.3f})" if "reward_model_diff" in r else "")
                             if "reward_model" in r else "-"),
            "KL to ref": f"{r['kl_to_reference']:.2f}",
            "length (tokens)": f"{r['length_tokens']:.1f}",
            "distinct-2": f"{r['distinct2']:.2f}" if "distinct2" in r else "-",
            "ended": f"{r['ended']:.0%}",
            "refused harmful": f"{r['refusal_harmful']:.0%}" if "refusal_harmful" in r else "-",
        })
    return rows


# the behaviour rates of an evaluation with HHH sets: key in a result row → column (which way is better)
BEHAVIOUR_COLUMNS = {
    "refusal_harmful": "refuses harmful requests (higher is better)",
    "refusal_lookalike": "refuses benign look-alikes (lower)",
    "idk_unanswerable": "says \"I don't know\" when there is no answer (higher)",
    "answered_answerable": "answers the answerable twins (higher)",
    "gold": "helpfulness: gold score on explain-to-a-kid",
}


def behaviour_rows(result: dict, names: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The document's before/after rows, one column per behaviour set that was evaluated, rates with their 95%
    intervals; [] when the evaluation had no such set beyond the harmful one."""
    names = names or {}
    keys = [k for k in BEHAVIOUR_COLUMNS if any(f"{k}_ci" in r for r in result["rows"])]
    if not any(k in keys for k in ("refusal_lookalike", "idk_unanswerable", "answered_answerable")):
        return []
    return [{"model": names.get(r["model"], r["model"]),
             **{BEHAVIOUR_COLUMNS[k]: _with_ci(r, k, percent=k != "gold") for k in keys}} for r in result["rows"]]


def describe_result(result: dict, names: dict[str, str] | None = None) -> str:
    """The table's caption: what was evaluated and what 'gold' means here."""
    names = names or {}
    judge = result.get("judge", "gold")
    gold_means = ("the simulated annotator without noise" if judge == "gold" else "no judge" if judge in ("", "none")
                  else f"the judge {judge}")
    checked = f"; accuracy by {result['checker']}, Δ paired on the same items" if "checker" in result else ""
    return (f"Held-out evaluation on {result['prompts']} prompts (gold = {gold_means}, 95% bootstrap intervals"
            f"{checked}; baseline: {names.get(result['baseline'], result['baseline'])})")


def format_result(result: dict, names: dict[str, str] | None = None) -> str:
    names = names or {}
    lines = [describe_result(result, names), "", table(result_rows(result, names))]
    behaviours = behaviour_rows(result, names)
    if behaviours:
        counts = ", ".join(f"{n} {kind}" for kind, n in result.get("behaviour_prompts", {}).items())
        lines += ["", f"What RLHF changes, row by row (held-out: {counts}; 95% bootstrap intervals):",
                  table(behaviours)]
    for shown in result.get("shown", []):
        lines += ["", f"Prompt: {shown['prompt']}"]
        lines += [f"  [{names.get(key, key)}] {value}" for key, value in shown.items() if key != "prompt"]
    for ex in result["examples"]:
        lines += ["", f"Prompt: {ex['prompt']}"]
        for key, value in ex.items():
            if key != "prompt":
                score = (f"gold {value['gold']:.3f}" if "gold" in value
                         else f"RM {value['reward_model']:.3f}" if "reward_model" in value else "")
                lines.append(f"  [{names.get(key, key)}]{f' ({score})' if score else ''} {value['response']}")
    return "\n".join(lines)
