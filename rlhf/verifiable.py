"""A built-in verifiable task: small arithmetic with a checker, for training on a reward that is a rule.

Problems are additions of two numbers from 2 to 30 and products of two digits from 2 to 9 ("What is 7 + 12? Answer
with the number only."), generated with fixed seeds: 400 for training and 200 held out, no problem in both. The
embedded SmolLM2-135M-Instruct gets about a fifth of the held-out ones right (19.5%, README) at temperature 0.7 with
48 new tokens, so there is room to learn, and a group of 8 answers to one problem usually holds a right one.

The checker reads the last integer of the answer (the model often restates the problem first: "7 + 12 = 19") and
compares it with the true result. `reward` is the checker as a reward function (1.0 right, 0.0 wrong), the form
`--reward_fn rlhf.verifiable:reward` expects: called with the prompts, the completions and the rows' other fields
(here `answer`).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from rlhf.config import cached_jsonl

SIZES = {"train": 400, "heldout": 200}
INSTRUCTION = "Answer with the number only."
_INTEGER = re.compile(r"-?\d+")


def _problem(rng: random.Random) -> tuple[str, int]:
    if rng.random() < 0.5:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"What is {a} + {b}? {INSTRUCTION}", a + b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b}? {INSTRUCTION}", a * b


def problems(split: str) -> list[dict]:
    """The split's problems as prompt rows with their `answer`: held-out first from one seeded stream, then train
    from the rest, each prompt once (of 29·29 sums and 8·8 products)."""
    if split not in SIZES:
        raise ValueError(f"arithmetic split must be one of {', '.join(SIZES)}, got '{split}'")
    rng, seen = random.Random(0), set()
    out: dict[str, list[dict]] = {"heldout": [], "train": []}
    for name in ("heldout", "train"):
        while len(out[name]) < SIZES[name]:
            prompt, answer = _problem(rng)
            if prompt not in seen:
                seen.add(prompt)
                out[name].append({"prompt": prompt, "answer": answer})
    return out[split]


def materialise(name: str) -> Path:
    """builtin:arithmetic_train / builtin:arithmetic_heldout as a file in the cache."""
    return cached_jsonl(name, problems(name.removeprefix("arithmetic_")))


def final_integer(text: str) -> int | None:
    found = _INTEGER.findall((text or "").replace(",", ""))
    return int(found[-1]) if found else None


def correct(completion: str, answer: int | str) -> bool:
    """Is the last integer of the completion the answer?"""
    return final_integer(completion) == int(answer)


def reward(prompts: list[str], completions: list[str], answer: list, **_) -> list[float]:
    """1.0 for a right answer, 0.0 otherwise (a reward function for `--reward_fn rlhf.verifiable:reward`)."""
    return [float(correct(c, a)) for c, a in zip(completions, answer)]
