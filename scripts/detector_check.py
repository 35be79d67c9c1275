"""Precision and recall of the refusal and "I don't know" detectors against answers labelled by hand.

    python scripts/detector_check.py bench/results/hhh_detector_check_2026-12-04.jsonl

Each line: {"answer", "refusal": bool} or {"answer", "idk": bool} (other fields are kept for reading). The file named
above holds 100 answers of the `make hhh` models to held-out prompts (25 harmful requests and 25 look-alikes
labelled for refusal, 25 unanswerable questions and 25 answerable twins labelled for "I don't know"), sampled with a
fixed seed from the evaluation's *_samples.jsonl and labelled by the rules in rlhf/tasks/hhh/README.md; the
detectors were not tuned on them.
"""

import json
import sys

from rlhf.detectors import is_refusal, says_dont_know


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    for label, detect in (("refusal", is_refusal), ("idk", says_dont_know)):
        labelled = [(r[label], detect(r["answer"])) for r in rows if label in r]
        tp = sum(1 for truth, said in labelled if truth and said)
        fp = sum(1 for truth, said in labelled if not truth and said)
        fn = sum(1 for truth, said in labelled if truth and not said)
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        print(f"{label}: {len(labelled)} answers, {tp + fn} labelled true; precision {precision:.3f} "
              f"({tp}/{tp + fp}), recall {recall:.3f} ({tp}/{tp + fn})")
        for row in rows:
            if label in row and row[label] != detect(row["answer"]):
                print(f"  missed ({'labelled true' if row[label] else 'labelled false'}): {row['answer'][:110]!r}")


if __name__ == "__main__":
    main(sys.argv[1])
