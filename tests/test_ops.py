import math

import pytest
import torch

from rlhf import ops
from rlhf.fast.attention import masked_attention
from rlhf.ops import (
    entropy_from_logits,
    logprobs_and_entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    whiten,
)


def _reference_logprobs(logits, labels, temperature):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("small_chunks", [False, True])
def test_logprobs_from_logits_matches_log_softmax_fp32(temperature, small_chunks, monkeypatch):
    if small_chunks:
        # 2 rows per chunk: exercises several chunks, including a short last one.
        monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 2 * 11)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g)

    ours_in = logits.clone().requires_grad_(True)
    ours = logprobs_from_logits(ours_in, labels, temperature=temperature)
    (ours * weights).sum().backward()

    ref_in = logits.clone().requires_grad_(True)
    ref = _reference_logprobs(ref_in, labels, temperature)
    (ref * weights).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (2, 5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_bf16(temperature, monkeypatch):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 3 * 13)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 4, 13, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, 13, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g)

    ours_in = logits.clone().requires_grad_(True)
    ours = logprobs_from_logits(ours_in, labels, temperature=temperature)
    (ours * weights).sum().backward()

    # Reference in float32 from the same bf16 values.
    ref_in = logits.float().requires_grad_(True)
    ref = _reference_logprobs(ref_in, labels, temperature)
    (ref * weights).sum().backward()

    assert ours.dtype == torch.float32
    assert ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad, atol=2e-2, rtol=2e-2)


def test_logprobs_from_logits_non_contiguous_slice(monkeypatch):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 2 * 7)
    g = torch.Generator().manual_seed(2)
    full = torch.randn(2, 6, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    sliced = full[:, :-1]  # the usual shift: not viewable as (N, V)
    assert not sliced.is_contiguous()
    ours = logprobs_from_logits(sliced, labels)
    ours.sum().backward()
    ours_grad = full.grad.clone()
    full.grad = None
    ref = _reference_logprobs(full[:, :-1], labels, 1.0)
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_grad, full.grad, atol=1e-5, rtol=1e-5)


def test_entropy_uniform_is_log_v_and_mask():
    logits = torch.zeros(2, 3, 8)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    h = entropy_from_logits(logits)
    # uniform over V = 8: H = log 8 ≈ 2.0794
    torch.testing.assert_close(h, torch.full((2, 3), math.log(8)))
    hm = entropy_from_logits(logits, mask=mask)
    torch.testing.assert_close(hm, torch.where(mask, math.log(8), 0.0))


def test_entropy_matches_manual_with_temperature_and_neg_inf():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g).to(torch.bfloat16)
    z = logits.float() / 0.7
    p = torch.softmax(z, -1)
    expected = -(p * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, temperature=0.7), expected, atol=1e-5, rtol=1e-5)
    # Two allowed tokens with equal logits, three banned (-inf): H = log 2 ≈ 0.6931, not NaN.
    banned = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf, -math.inf]]])
    torch.testing.assert_close(entropy_from_logits(banned), torch.tensor([[math.log(2)]]))


X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean():
    # valid values 1, 2, 4
    torch.testing.assert_close(masked_sum(X, M), torch.tensor(7.0))
    torch.testing.assert_close(masked_mean(X, M), torch.tensor(7.0 / 3))  # (1+2+4)/3 = 2.3333
    # per row: (1+2)/2 = 1.5 ; 4/1 = 4
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0]))
    # an empty row and an empty mask give 0, not NaN; NaN padding does not leak
    x_nan = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    m2 = torch.tensor([[1, 0], [0, 0]])
    torch.testing.assert_close(masked_mean(x_nan, m2, dim=1), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(masked_mean(X, torch.zeros_like(M)), torch.tensor(0.0))


def test_masked_var():
    # deviations from 7/3: -4/3, -1/3, 5/3; squares sum to (16 + 1 + 25)/9 = 42/9 = 14/3
    torch.testing.assert_close(masked_var(X, M), torch.tensor(14.0 / 3 / 2))  # unbiased: /2 = 7/3
    torch.testing.assert_close(masked_var(X, M, unbiased=False), torch.tensor(14.0 / 9))  # /3
    one = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert masked_var(X, one).item() == 0.0  # fewer than 2 valid → 0
    assert masked_var(X, torch.zeros_like(M)).item() == 0.0


def test_whiten():
    mean, var = 7.0 / 3, 7.0 / 3
    valid = M.bool()
    expected = torch.where(valid, (X - mean) / math.sqrt(var + 1e-8), 0.0)
    torch.testing.assert_close(whiten(X, M), expected)
    expected_keep_mean = torch.where(valid, (X - mean) / math.sqrt(var + 1e-8) + mean, 0.0)
    torch.testing.assert_close(whiten(X, M, shift_mean=False), expected_keep_mean)
    w = whiten(X, M)
    assert abs(masked_mean(w, M).item()) < 1e-6
    assert abs(masked_var(w, M).item() - 1.0) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_are_left_as_they_were(dtype):
    """The chunks are scaled by 1/T in place after their upcast; for float32 logits that must not be in place on
    the caller's tensor (which backward also reads)."""
    logits = (torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    before = logits.clone()
    leaf = logits.clone().requires_grad_(True)
    logprobs_from_logits(leaf, torch.zeros(2, 4, dtype=torch.long), temperature=0.7).sum().backward()
    entropy_from_logits(logits, temperature=0.7)
    logprobs_from_logits(logits, torch.zeros(2, 4, dtype=torch.long), temperature=0.7)
    assert torch.equal(logits, before) and torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_in_one_pass_equal_the_two_functions(dtype, monkeypatch):
    """One pass over the logits gives the same log-probabilities (and gradient) and entropy as the two functions."""
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 40)  # several chunks
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 11, generator=g).to(dtype)
    logits[0, 1, 3] = float("-inf")
    labels = torch.randint(0, 11, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    one = logits.clone().requires_grad_(True)
    two = logits.clone().requires_grad_(True)
    logprobs, entropy = logprobs_and_entropy_from_logits(one[:, :], labels, mask, temperature=0.7)
    expected_logprobs = logprobs_from_logits(two, labels, temperature=0.7)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=0, rtol=0)
    torch.testing.assert_close(entropy, entropy_from_logits(logits, mask, temperature=0.7), atol=0, rtol=0)
    assert not entropy.requires_grad and torch.isfinite(entropy).all()
    (logprobs * torch.arange(12.0).view(3, 4)).sum().backward()
    (expected_logprobs * torch.arange(12.0).view(3, 4)).sum().backward()
    torch.testing.assert_close(one.grad, two.grad, atol=0, rtol=0)


def _reference_attention(query, key, value, allowed, scale):
    """Attention written out in float64: repeated KV heads, a masked softmax, rows with nothing allowed give 0."""
    group = query.shape[1] // key.shape[1]
    k, v = key.double().repeat_interleave(group, 1), value.double().repeat_interleave(group, 1)
    scores = (query.double() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v


def _attention_case(dtype):
    torch.manual_seed(0)
    batch, heads, kv_heads, width, head_dim = 3, 6, 2, 7, 8  # grouped: 3 query heads per key/value head
    query = torch.randn(batch, heads, width, head_dim).to(dtype).requires_grad_()
    key = torch.randn(batch, kv_heads, width, head_dim).to(dtype).requires_grad_()
    value = torch.randn(batch, kv_heads, width, head_dim).to(dtype).requires_grad_()
    padding = torch.arange(width) >= torch.tensor([[0], [2], [4]])  # left padding of 0, 2 and 4 tokens
    allowed = (torch.ones(width, width, dtype=torch.bool).tril() & padding[:, None, :])[:, None]  # (B, 1, T, T)
    grad_out = torch.randn(batch, heads, width, head_dim).to(dtype) * padding[:, None, :, None]
    return query, key, value, allowed, grad_out


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_masked_attention_and_its_backward_equal_attention_written_out(dtype, tolerance):
    query, key, value, allowed, grad_out = _attention_case(dtype)
    out = masked_attention(query, key, value, allowed)
    out.backward(grad_out)
    ours = (out, query.grad, key.grad, value.grad)
    leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected = _reference_attention(*leaves, allowed, query.shape[-1] ** -0.5)
    expected.backward(grad_out.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, (expected, *(t.grad for t in leaves))):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        assert torch.allclose(got.double(), want, atol=tolerance, rtol=tolerance), name
    # a query row with no key allowed (query 0 of the padded rows): output and its gradient are 0, not NaN
    assert out[1, :, 0].abs().max() == 0 and query.grad[2, :, :4].abs().max() == 0
