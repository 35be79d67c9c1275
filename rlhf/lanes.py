"""Two independent pieces of work side by side on a CPU, each on its own share of the cores.

Why: on a small CPU a model's training-width matmuls use the cores poorly. On this 2-core machine several of
SmolLM2-135M's bf16 matmuls at 784 rows (8 sequences of 98 tokens) run no faster on 2 threads than on 1 (q and
o projections forward, the MLP's input gradients, the down projection forward: 0.98-1.10x). So two backward
passes that do not depend on each other (PPO's policy and its separate critic) can finish sooner each on one
core than taking turns on two: in PPO's like-for-like iteration (compiled, bf16, in-process A/B, median of 10)
the backward passes took 1.51 s side by side against 1.60 in turn, the iteration 5.28 against 5.48
(`bench/README.md`). Forward passes side by side were slower there (0.98 against 0.83 s), so PPO runs only its
backward passes this way.

`SideBySide(enabled).run(first, second)` returns `(first(), second())`. When enabled, `second` runs in a
worker thread while `first` runs in the calling thread, each with half the intra-op threads; the calling
thread gets its thread count back afterwards. Grad mode, which is per thread in torch, is carried over to
the worker; autocast is not, so each piece enters its own. Global switches (the attention-kernel choice of
`sdpa_kernel`) must be set around the call, not inside a piece: a piece that left one would undo it under
the other.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")


def _run_with_threads(threads: int, grad: bool, work: Callable[[], B]) -> B:
    torch.set_num_threads(threads)
    with torch.set_grad_enabled(grad):
        return work()


class SideBySide:
    """Runs pairs of independent pieces of work at once (see the module's docstring); off, it runs them in turn."""

    def __init__(self, enabled: bool):
        self.threads = torch.get_num_threads()
        self.enabled = enabled and self.threads >= 2
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhf-lane") if self.enabled else None

    def run(self, first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
        if not self.enabled:
            return first(), second()
        share = self.threads // 2
        pending = self._worker.submit(_run_with_threads, self.threads - share, torch.is_grad_enabled(), second)
        torch.set_num_threads(share)
        try:
            first_result = first()
        finally:
            torch.set_num_threads(self.threads)
            second_result = pending.result()  # waits even when `first` failed, so nothing runs on behind our back
        return first_result, second_result

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
