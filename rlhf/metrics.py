"""Pure metrics of a set of answers: means with bootstrap intervals, win rates, repetition, refusal detection,
and the reward-hacking alarms of PPO's monitor. Plain Python on lists of numbers and strings (no torch)."""

from __future__ import annotations

import random
from typing import Sequence

from rlhf.annotators import distinct_n, words
from rlhf.detectors import is_refusal, says_dont_know  # noqa: F401  (part of this module's metrics)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low = means[int((1 - level) / 2 * resamples)]
    high = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return low, high


def win_outcomes(scores: Sequence[float], baseline: Sequence[float], tie_tolerance: float = 1e-6) -> list[float]:
    """Per prompt: 1 if `scores` beats `baseline`, 0.5 for a tie, 0 for a loss; their mean is the win rate,
    and a bootstrap over them its interval. The tolerance absorbs float noise: the same answer embedded in
    another batch can score a few 1e-8 apart."""
    if len(scores) != len(baseline):
        raise ValueError(f"paired scores need equal lengths, got {len(scores)} and {len(baseline)}")
    return [1.0 if a - b > tie_tolerance else 0.0 if b - a > tie_tolerance else 0.5 for a, b in zip(scores, baseline)]


def win_rate(scores: Sequence[float], baseline: Sequence[float],
             tie_tolerance: float = 1e-6) -> tuple[float, int, int, int]:
    """Share of prompts where `scores` beats `baseline`, a tie counting half → (rate, wins, ties, losses)."""
    outcomes = win_outcomes(scores, baseline, tie_tolerance)
    wins, losses = outcomes.count(1.0), outcomes.count(0.0)
    return sum(outcomes) / max(1, len(outcomes)), wins, len(outcomes) - wins - losses, losses


def repetition(texts: Sequence[str]) -> dict[str, float]:
    """distinct-1 and distinct-2 within each answer (mean over the answers long enough to have n-grams), and
    distinct-2 across all answers: within catches an answer that loops, across catches every answer reusing
    the same phrases (a reward model's favourites)."""
    out = {}
    for n in (1, 2):
        long_enough = [t for t in texts if len(words(t)) >= n]
        out[f"distinct{n}"] = mean([distinct_n(t, n) for t in long_enough]) if long_enough else 0.0
    out["distinct2_all"] = distinct_n(texts, 2)
    return out


def hacking_warnings(checks: list[dict[str, float]], window: int = 3, length_drift: float = 0.5,
                     distinct_drift: float = 0.15, gold_tolerance: float = 0.01) -> list[str]:
    """Reward-hacking alarms from the monitor's history, one dict per check (gold, reward_model, length, distinct2).

    - the reward model's score rose at each of the last `window` checks while the gold score fell by more
      than `gold_tolerance` over them: the policy pleases the reward model, not the judge;
    - the mean length moved more than `length_drift` (a share) from the first check: rambling or clipping;
    - distinct-2 fell more than `distinct_drift` (a share) from the first check: the answers repeat themselves.
    """
    alarms = []
    recent = checks[-window:]
    if window >= 2 and len(recent) == window and all("gold" in c and "reward_model" in c for c in recent):
        rising = all(b["reward_model"] > a["reward_model"] for a, b in zip(recent, recent[1:]))
        gold_fall = recent[0]["gold"] - recent[-1]["gold"]
        if rising and gold_fall > gold_tolerance:
            alarms.append(f"the reward model's score rose at each of the last {window} checks "
                          f"({recent[0]['reward_model']:.3f} → {recent[-1]['reward_model']:.3f}) while the gold "
                          f"score fell ({recent[0]['gold']:.3f} → {recent[-1]['gold']:.3f}): the policy is pleasing "
                          f"the reward model, not the judge (reward hacking); a larger β or an earlier checkpoint "
                          f"may serve better")
    if len(checks) >= 2:
        first, last = checks[0], checks[-1]
        if "length" in first and first["length"] > 0:
            change = (last["length"] - first["length"]) / first["length"]
            if abs(change) > length_drift:
                alarms.append(f"the mean answer length moved {change:+.0%} since the first check "
                              f"({first['length']:.1f} → {last['length']:.1f} tokens): "
                              f"{'rambling' if change > 0 else 'ever shorter answers'} may be what the reward "
                              f"model rewards")
        if "distinct2" in first and first["distinct2"] > 0:
            fall = (first["distinct2"] - last["distinct2"]) / first["distinct2"]
            if fall > distinct_drift:
                alarms.append(f"distinct-2 fell {fall:.0%} since the first check ({first['distinct2']:.3f} → "
                              f"{last['distinct2']:.3f}): the answers repeat themselves")
    return alarms
