"""Turn labels into the prompt/chosen/rejected JSONL that `rlhf reward` and `rlhf dpo` read."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from rlhf.annotate import store
from rlhf.annotate.stats import unique_mode, votes_by_pair


@dataclass
class ExportReport:
    exported: int = 0
    ties: int = 0
    both_bad: int = 0
    no_majority: int = 0  # e.g. one vote A, one vote B
    too_few_labels: int = 0
    unlabelled: int = 0
    records: list[dict] = field(default_factory=list)

    def summary(self, out: Path) -> str:
        return (
            f"wrote {self.exported} preference pairs to {out}; dropped: "
            f"{self.ties} tie, {self.both_bad} both bad, {self.no_majority} without a majority, "
            f"{self.too_few_labels} with fewer labels than --min-labels; "
            f"{self.unlabelled} pairs not labelled yet"
        )


def majority_records(engine: Engine, min_labels: int = 1) -> ExportReport:
    """One record per pair whose majority vote is A or B; everything else is counted."""
    report = ExportReport()
    votes = votes_by_pair(store.labels(engine))
    for pair in store.all_pairs(engine):
        pair_votes = votes.get(pair.id)
        if not pair_votes:
            report.unlabelled += 1
            continue
        if sum(pair_votes.values()) < min_labels:
            report.too_few_labels += 1
            continue
        winner = unique_mode(pair_votes)
        if winner == "tie":
            report.ties += 1
        elif winner == "both_bad":
            report.both_bad += 1
        elif winner is None:
            report.no_majority += 1
        else:
            chosen, rejected = (
                (pair.response_a, pair.response_b) if winner == "a" else (pair.response_b, pair.response_a)
            )
            report.records.append({"prompt": pair.prompt, "chosen": chosen, "rejected": rejected})
            report.exported += 1
    return report


def write_jsonl(records: list[dict], out: Path) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            for record in records:
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
