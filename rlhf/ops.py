"""Tensor helpers shared by the losses and the trainers (imports torch only).

- ``logprobs_from_logits``: log-probabilities of the labels, chunked over rows in float32.
- ``entropy_from_logits``: per-token entropy, chunked over rows in float32, no grad.
- ``logprobs_and_entropy_from_logits``: both from one pass over the logits.
- ``masked_sum`` / ``masked_mean`` / ``masked_var``: reductions over the valid elements only.
- ``whiten``: zero-mean unit-variance over the valid elements of the whole batch.

A ``mask`` is a bool (or 0/1) tensor shaped like ``x``; True marks a real element.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

# Upper bound on the number of logits upcast to float32 at once (64 MiB of fp32).
# Rows per chunk = max(1, _CHUNK_ELEMENTS // V). Module-level so tests can shrink it.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(logits: torch.Tensor) -> Iterator[Tuple[slice, torch.Tensor]]:
    """Yield ``(flat_rows, chunk)`` covering every row of ``logits`` ``(..., V)`` without copying.

    ``flat_rows`` indexes the rows of ``logits`` flattened to ``(N, V)``; ``chunk`` is a view
    ``(n, V)`` of those rows. A contiguous tensor is chunked as one flat list of rows; a
    non-contiguous ``(B, T, V)`` one (e.g. ``logits[:, :-1]``) row by row of the batch, so
    that a sliced input is never copied whole.
    """
    vocab = logits.shape[-1]
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    try:
        flat = logits.view(-1, vocab)
    except RuntimeError:
        flat = None
    if flat is not None:
        for start in range(0, flat.shape[0], rows):
            stop = min(start + rows, flat.shape[0])
            yield slice(start, stop), flat[start:stop]
        return
    if logits.dim() != 3:
        raise ValueError("non-contiguous logits must be (B, T, V)")
    seq = logits.shape[1]
    for b in range(logits.shape[0]):
        for start in range(0, seq, rows):
            stop = min(start + rows, seq)
            yield slice(b * seq + start, b * seq + stop), logits[b, start:stop]


def _upcast_scaled(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """chunk / temperature as a new float32 tensor: divided in place after the cast, never in the caller's logits
    (`.float()` of a float32 tensor is that tensor itself)."""
    if chunk.dtype == torch.float32:
        return chunk / temperature
    return chunk.float().div_(temperature)


class _LabelLogprob(torch.autograd.Function):
    """log softmax(logits / T)[label], chunk by chunk in float32.

    Plain autograd would keep every upcast chunk alive until backward; here forward keeps nothing but its inputs
    and backward rebuilds the softmax one chunk at a time:
    d logp / d logits = (onehot(label) - softmax(logits / T)) / T.
    Each chunk goes through the fused `log_softmax` / `softmax` kernels, faster than logsumexp and exp written
    out (bench/README.md, "Why each speed path exists").
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, want_entropy):
        vocab = logits.shape[-1]
        flat_labels = labels.reshape(-1)
        picked = torch.empty(flat_labels.shape[0], dtype=torch.float32, device=logits.device)
        entropy = torch.empty(flat_labels.shape[0] if want_entropy else 0, dtype=torch.float32, device=logits.device)
        for rows, chunk in _row_chunks(logits):
            log_probs = torch.log_softmax(_upcast_scaled(chunk, temperature), dim=-1)
            picked[rows] = log_probs.gather(-1, flat_labels[rows].unsqueeze(-1)).squeeze(-1)
            if want_entropy:  # from the same log-softmax: no second upcast and normalisation of the chunk
                entropy[rows] = _entropy_from_log_probs(log_probs)
        ctx.save_for_backward(logits, flat_labels)
        entropy = entropy.view(labels.shape) if want_entropy else entropy
        ctx.mark_non_differentiable(entropy)
        ctx.temperature = temperature
        ctx.vocab = vocab
        return picked.view(labels.shape), entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_entropy):
        logits, flat_labels = ctx.saved_tensors
        t = ctx.temperature
        g = grad_out.reshape(-1).float() / t
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_flat = grad.view(-1, ctx.vocab)
        for rows, chunk in _row_chunks(logits):
            g_rows = g[rows].unsqueeze(-1)
            chunk_grad = torch.softmax(_upcast_scaled(chunk, t), dim=-1).mul_(-g_rows)
            chunk_grad.scatter_add_(-1, flat_labels[rows].unsqueeze(-1), g_rows)
            grad_flat[rows] = chunk_grad
        return grad, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    logits ``(B, T, V)`` of any float dtype (bf16 is fine), labels ``(B, T)`` long with values in
    ``[0, V)`` (replace an ignore index such as -100 by 0 and mask it out) → ``(B, T)`` float32.
    Only one chunk of rows is upcast to float32 at a time, in forward and in backward; gradients
    flow to ``logits`` (in their own dtype).
    """
    return _label_logprobs(logits, labels, temperature, want_entropy=False)[0]


def logprobs_and_entropy_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None, temperature: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_from_logits`` and ``entropy_from_logits`` from one pass over the logits: ``(B, T)`` each, the
    log-probabilities with their gradient, the entropy without one (0 where ``mask`` is False)."""
    logprobs, entropy = _label_logprobs(logits, labels, temperature, want_entropy=True)
    return logprobs, zero_outside(entropy, mask)


def _label_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float, want_entropy: bool):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    return _LabelLogprob.apply(logits, labels.long(), float(temperature), want_entropy)


def zero_outside(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``values`` where ``mask`` is True, 0 elsewhere. Not ``values * mask``: an Inf at a padding position times 0 is
    NaN, and one NaN spreads through every sum that reads it."""
    return values if mask is None else torch.where(mask.bool(), values, torch.zeros_like(values))


def _entropy_from_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """H = -sum p log p per row of float32 log-probabilities (changed in place). A -inf logit has p = 0 and must add
    0, not 0 * -inf = NaN: its log p is clamped to the lowest finite float first."""
    log_p = log_p.clamp_(min=torch.finfo(torch.float32).min)
    return -torch.linalg.vecdot(log_p.exp(), log_p)


@torch.no_grad()
def entropy_from_logits(
    logits: torch.Tensor, mask: Optional[torch.Tensor] = None, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position: ``(B, T, V)`` → ``(B, T)`` float32.

    Chunked in float32 like ``logprobs_from_logits``; no gradient. Where ``mask`` ``(B, T)`` is
    given, invalid positions are set to 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = torch.empty(logits.shape[:-1].numel(), dtype=torch.float32, device=logits.device)
    for rows, chunk in _row_chunks(logits):
        # one fused log_softmax and a row-wise dot: about twice as fast as logsumexp, exp and a masked product
        out[rows] = _entropy_from_log_probs(torch.log_softmax(_upcast_scaled(chunk, temperature), dim=-1))
    return zero_outside(out.view(logits.shape[:-1]), mask)


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask.to(device=x.device, dtype=torch.bool).expand_as(x)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of ``x`` over the valid elements: a scalar with ``dim=None``, else reduced over ``dim``."""
    m = _valid(x, mask)
    # where, not x * mask: a NaN/inf at a padding position must not leak into the sum.
    kept = torch.where(m, x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over the valid elements: a scalar with ``dim=None``, else per ``dim`` slice.

    A reduction with no valid element gives 0 (not NaN).
    """
    m = _valid(x, mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid elements (a scalar).

    ``unbiased`` divides by n - 1 (Bessel), else by n. With fewer than 2 valid elements the
    variance is returned as 0 (the biased estimate is 0 there anyway; the unbiased one is undefined).
    """
    m = _valid(x, mask)
    n = m.sum()
    centred = torch.where(m, x - masked_mean(x, m), torch.zeros_like(x))
    denom = (n - 1) if unbiased else n
    var = centred.pow(2).sum() / denom.clamp(min=1)
    return torch.where(n < 2, torch.zeros_like(var), var)


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean/var over the valid elements of the whole batch.

    With ``shift_mean=False`` the mean is added back (only the scale changes). The result is 0 on
    invalid positions. Shapes: any, e.g. ``(B, T)``.
    """
    m = _valid(x, mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))
