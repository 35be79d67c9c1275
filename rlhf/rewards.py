"""Reward functions written in Python: a rule that scores answers (a checker, a length rule, a format rule).

A function is named `path/to/file.py:function` or `package.module:function` and is called once per batch as
`function(prompts, completions, **fields)`: the prompts as text (the last user turn), the completions, and every
other field of the data rows as one list per field (e.g. `answer=[...]`). It returns one number per completion.
Several functions are combined as a weighted sum. A function that raises, returns the wrong number of values or a
value that is not a finite number is an error that names the function (and the row).

`rlhf.verifiable:reward` (the built-in arithmetic task's checker) is one; the gold judge can be one too, but only when
asked for by name (`rlhf.rewards:gold`): it is meant for evaluation, and training on it removes the point of
measuring against it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable, Sequence

RewardFunction = Callable[..., Sequence[float]]


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded or that returned something other than one number per answer."""


def load(spec: str) -> RewardFunction:
    """`file.py:function` or `module:function` → the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RewardFunctionError(f"reward function '{spec}': write it as path/to/file.py:function or module:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardFunctionError(f"reward function '{spec}': no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"rlhf_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error in it is theirs to see, named
            raise RewardFunctionError(f"reward function '{spec}': importing {path} failed: {e!r}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardFunctionError(f"reward function '{spec}': cannot import {target}: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardFunctionError(f"reward function '{spec}': {target} has no function '{name}'")
    return function


def call(spec: str, function: RewardFunction, prompts: list[str], completions: list[str],
         fields: dict[str, list]) -> list[float]:
    """One function's scores, checked: one finite number per completion."""
    try:
        scores = function(prompts, completions, **fields)
    except Exception as e:  # noqa: BLE001 — the user's code: its error is reported with its name and the batch
        raise RewardFunctionError(f"reward function '{spec}' raised {e!r} on a batch of {len(prompts)} answers "
                                  f"(first prompt: {prompts[0][:80]!r})") from None
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise RewardFunctionError(f"reward function '{spec}' must return one number per completion, "
                                  f"got {type(scores).__name__}: {str(scores)[:120]}") from None
    if len(scores) != len(completions):
        raise RewardFunctionError(f"reward function '{spec}' returned {len(scores)} values for {len(completions)} "
                                  f"completions")
    for row, score in enumerate(scores):
        if not math.isfinite(score):
            raise RewardFunctionError(f"reward function '{spec}' returned {score} for row {row} "
                                      f"(prompt {prompts[row][:80]!r}, completion {completions[row][:80]!r})")
    return scores


class WeightedRewards:
    """Several reward functions as one: Σ weight · function(...), per completion."""

    def __init__(self, specs: list[str], weights: list[float] | None = None):
        weights = list(weights) if weights else [1.0] * len(specs)
        if len(weights) != len(specs):
            raise RewardFunctionError(f"{len(specs)} reward functions but {len(weights)} weights")
        self.specs, self.weights = list(specs), weights
        self.functions = [load(spec) for spec in self.specs]

    def __call__(self, prompts: list[str], completions: list[str], fields: dict[str, list]) -> tuple[list[float],
                                                                                                      dict[str, float]]:
        """→ (the weighted sum per completion, each function's mean for the log)."""
        total = [0.0] * len(completions)
        means = {}
        for spec, function, weight in zip(self.specs, self.functions, self.weights):
            scores = call(spec, function, prompts, completions, fields)
            total = [t + weight * s for t, s in zip(total, scores)]
            means[spec] = sum(scores) / len(scores)
        return total, means


@functools.cache
def _gold_annotator():
    from rlhf.annotators import SimulatedAnnotator

    return SimulatedAnnotator(noise_temperature=0.0)


def gold(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The built-in simulated annotator's noise-free gold score, as a reward function (only by explicit request)."""
    return _gold_annotator().gold_scores(prompts, completions)
