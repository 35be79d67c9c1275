"""Two independent pieces of work side by side on a CPU, each on its own share of the cores.

Why: on a small CPU a model's training-width matmuls use the cores poorly: several of SmolLM2-135M's bf16 matmuls
at PPO's training width run no faster on 2 threads than on 1. So two backward passes that do not depend on each
other (PPO's policy and its separate critic) can finish sooner each on one core than taking turns on two. Forward
passes side by side were slower, so PPO runs only its backward passes this way (`backward_and_clip`). The A/B
figures are in bench/README.md.

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
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

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


def backward_and_clip(terms: list[tuple[torch.Tensor, list[torch.Tensor]]], max_norm: float,
                      lanes: SideBySide | None = None) -> torch.Tensor:
    """Backward from the losses in `terms` ((loss, the parameters it trains) each), then clip all their gradients
    together to `max_norm` → the total gradient norm before clipping.

    `lanes` None: the losses share one graph (PPO's value head on the policy): one backward of their sum. Given:
    two graphs with no node in common (PPO's policy and its separate critic): each backward measures its own
    gradient norm, both at once when the lanes are enabled (else in turn), and the clipping uses the norm of both,
    as `clip_grad_norm_` would. The gradients are the sum's either way.
    """
    parameters = [p for _, params in terms for p in params]
    if lanes is None:
        sum(loss for loss, _ in terms).backward()
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def backward_then_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        def work() -> torch.Tensor:
            loss.backward()
            return get_total_norm([p.grad for p in params if p.grad is not None])
        return work

    first, second = terms
    side_norms = lanes.run(backward_then_norm(*first), backward_then_norm(*second))
    total = get_total_norm(torch.stack(side_norms))
    clip_grads_with_norm_(parameters, max_norm, total)
    return total
