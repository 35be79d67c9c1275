"""Attention for short bf16 training sequences on CPU: the flash kernel's forward with our own backward."""

from __future__ import annotations

from typing import Optional

import torch


class _MaskedAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale where allowed, else −inf)·v: forward by aten's fused (flash) CPU kernel, backward ours.

    Why: on CPU at short widths the flash kernel's forward is fast but its backward is slow (bench/README.md,
    "Why each speed path exists"). The forward also returns the log-sum-exp of every row, so the backward rebuilds
    the probabilities without another max or sum:
        P = exp(q·kᵀ·scale − lse) (0 where not allowed),  dV = Pᵀ·dO,  dP = dO·Vᵀ,
        dS = P ∘ (dP − rowsum(P ∘ dP)),  dQ = dS·K·scale,  dK = dSᵀ·Q·scale,
    all in float32. rowsum(P ∘ dP) equals rowsum(dO ∘ O), but does not read O, which is rounded to the input dtype.
    Grouped-query attention: query head h reads key/value head h // (heads / kv_heads), as `repeat_kv` does; the
    query heads of one group are stacked along the rows, so K and V are never repeated in the backward.
    Left padding leaves rows with nothing allowed: their output is 0 and so are their gradients.
    In bf16 its errors against float32 are those of the math kernel's or smaller than the flash backward's (the
    measured table is in bench/README.md).
    """

    @staticmethod
    def forward(ctx, query, key, value, allowed, scale):
        group = query.shape[1] // key.shape[1]
        additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        additive.masked_fill_(~allowed, float("-inf"))
        out, log_sum_exp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), 0.0, False,
            attn_mask=additive, scale=scale)
        ctx.save_for_backward(query, key, value, allowed, log_sum_exp)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, allowed, log_sum_exp = ctx.saved_tensors
        scale = ctx.scale
        batch, heads, width, head_dim = query.shape
        kv_heads, kv_width = key.shape[1], key.shape[2]
        rows = heads // kv_heads * width  # a kv head's query heads, stacked
        q = query.float().reshape(batch, kv_heads, rows, head_dim)
        k, v = key.float(), value.float()
        grad_o = grad_out.float().reshape(batch, kv_heads, rows, head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)).view(batch, heads, width, kv_width)
        probs = torch.exp(scores * scale - log_sum_exp.float().unsqueeze(-1)).masked_fill(~allowed, 0.0)
        grad_p = torch.matmul(grad_o, v.transpose(-1, -2)).view(batch, heads, width, kv_width)
        grad_s = probs * (grad_p - (probs * grad_p).sum(-1, keepdim=True)) * scale
        probs, grad_s = probs.view(batch, kv_heads, rows, kv_width), grad_s.view(batch, kv_heads, rows, kv_width)
        grad_q = torch.matmul(grad_s, k).view(batch, heads, width, head_dim)
        grad_k = torch.matmul(grad_s.transpose(-1, -2), q)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_o)
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), None, None


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Attention on CPU: query ``(B, H, T, D)``, key and value ``(B, H_kv, S, D)`` with H a multiple of H_kv, and
    ``allowed`` a bool mask broadcastable to ``(B, H, T, S)`` (True: the query may read that key) → ``(B, H, T, D)``.
    The scale defaults to 1/√D. See `_MaskedAttention` for why and how; compiled layers (`rlhf.fast.compile`) use it
    for short bf16 training sequences on CPU."""
    return _MaskedAttention.apply(query, key, value, allowed, query.shape[-1] ** -0.5 if scale is None else scale)
