"""A run that goes wrong stops loudly: non-finite steps are skipped and counted, a non-finite model is never saved.

One optimiser step whose loss or gradient norm is NaN or infinite would write NaN into every weight (AdamW's
moments keep it forever). `BadSteps` says whether a step may be applied; the stage skips the optimiser update
of a step it refuses, and after `max_bad_steps` refused steps in a row stops with `BadStepError`, naming the
step, while the weights are still those of the last good step. `nonfinite_tensors` is what `save_atomic` uses to
refuse a checkpoint holding NaN or Inf.
"""

from __future__ import annotations

from typing import Iterable

import torch

from rlhf.distributed import all_agree
from rlhf.tracking import say


class BadStepError(ValueError):
    """Too many non-finite steps in a row: the run has diverged."""


class BadSteps:
    """Counts the steps whose loss or gradient norm was not finite; `ok(step, ...)` → apply this step's update?"""

    def __init__(self, stage: str, max_bad_steps: int, unit: str = "steps"):
        self.stage, self.unit = stage, unit  # PPO counts its updates (several per step)
        self.limit = max_bad_steps
        self.in_a_row = 0
        self.total = 0

    def ok(self, step: int, **values: torch.Tensor | float) -> bool:
        """True when every value is finite; else count the step, say which value was bad, and raise once
        `max_bad_steps` in a row were bad."""
        bad = [name for name, value in values.items() if not bool(torch.isfinite(torch.as_tensor(value)).all())]
        if all_agree(not bad):  # with several processes every rank decides the same, so their weights stay equal
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        shown = ", ".join(f"{name}={float(torch.as_tensor(values[name]).float().flatten()[0])}" for name in bad) \
            or "a loss or gradient norm on another process"
        bad = bad or ["loss or gradient norm (on another process)"]
        say(f"[{self.stage}] step {step}: {shown} is not finite; update skipped ({self.in_a_row} in a row, "
            f"{self.total} in all; the limit is max_bad_steps={self.limit})")
        if self.in_a_row >= self.limit:
            raise BadStepError(f"{self.stage}: {self.in_a_row} {self.unit} in a row up to step {step} had a non-finite "
                               f"{' and '.join(bad)}; stopped with the weights of the last good step (lower lr, "
                               f"check the data, or raise max_bad_steps)")
        return False

    def check_last(self, steps: int) -> None:
        """At the end of training: a run whose last steps were skipped ends with weights that produced a non-finite
        loss (a diverged lr does that after one huge update): an error, not a checkpoint."""
        if self.in_a_row:
            raise BadStepError(f"{self.stage}: the last {self.in_a_row} {self.unit} of {steps} steps had a non-finite "
                               f"loss or gradient norm; the weights diverged and are not saved (lower lr)")

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, tensor in named
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all())]
