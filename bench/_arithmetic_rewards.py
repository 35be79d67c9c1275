"""The reward both sides of bench/grpo_vs_trl.py train on: the built-in arithmetic checker (1 for a right answer)
plus a small bonus for brevity, so that the answers to one problem differ in reward even when all of them are wrong
(as a tiny random model's always are) and the first-batch loss check has non-zero advantages to compare."""

from __future__ import annotations

from rlhf import verifiable


def reward(prompts: list[str], completions: list[str], answer: list, **_) -> list[float]:
    right = verifiable.reward(prompts, completions, answer)
    return [r + 0.2 * max(0.0, 1.0 - len(c.strip()) / 200) for r, c in zip(right, completions)]
