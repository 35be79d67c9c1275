"""Our decode loop (`rollout.decode`), its token draw, and the two speed levers around sampling and scoring:
frozen Linears stored in bf16 and the attention kernel chosen by width. Tiny models built here."""

import contextlib

import pytest
import torch

from rlhf.data import encode_prompt, pad_left
from rlhf.fast import attention_for_width, linears_to_bf16
from rlhf.fast import compile as fast_compile
from rlhf.hardware import autocast
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.rollout import decode, draw_tokens, next_token

PROMPTS = [[{"role": "user", "content": "hi"}],
           [{"role": "user", "content": "tell me about the sea and the fish in it"}],
           [{"role": "user", "content": "why"}]]
CPU = torch.device("cpu")


def test_draw_tokens_follows_the_distribution_and_never_draws_a_zero():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3]).expand(40_000, 4)
    drawn = draw_tokens(probs)
    frequency = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert frequency[1] == 0
    # binomial sd at n=40k is at most 0.0025; 0.01 is four of them
    assert torch.allclose(frequency, probs[0], atol=0.01), frequency


def test_draw_tokens_unnormalised_rows():
    """Rows need not sum to one (top-p zeroes part of them): the draw is over the row's own mass."""
    torch.manual_seed(1)
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.25]]).expand(20_000, 4)
    frequency = torch.bincount(draw_tokens(probs), minlength=4).float() / 20_000
    assert frequency[0] == frequency[2] == 0
    assert abs(frequency[1] - 0.5) < 0.02


def test_next_token_top_p_keeps_the_nucleus_only():
    torch.manual_seed(2)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20_000, 4)
    # mass before each sorted token: 0, 0.5, 0.8, 0.95; top_p 0.7 keeps the first two, renormalised
    frequency = torch.bincount(next_token(logits, 1.0, 0.7, greedy=False), minlength=4).float() / 20_000
    assert frequency[2] == frequency[3] == 0
    assert abs(frequency[0] - 0.625) < 0.02
    assert torch.equal(next_token(logits[:2], 1.0, 1.0, greedy=True), torch.tensor([0, 0]))


def _prompts(tokenizer):
    return pad_left([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)


def test_greedy_decode_equals_transformers_generate(tiny_model):
    """Left-padded prompts of different lengths: the same tokens as `generate`, row by row."""
    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, CPU, trainable=False)
    ids, mask = _prompts(tokenizer)
    with torch.no_grad():
        ours = decode(model, ids, mask, 12, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    theirs = theirs[:, ids.shape[1]:]
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


class _EosLover(torch.nn.Module):
    """The tiny model with a large bonus on EOS: greedy decoding ends at once unless EOS is held back."""

    def __init__(self, inner, eos_id: int):
        super().__init__()
        self.inner, self.config, self.eos_id = inner, inner.config, eos_id

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits[..., self.eos_id] += 100.0
        return out


def test_decode_stops_at_eos_and_min_new_tokens_holds_it_back(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = _EosLover(load_causal_lm(tiny_model, CPU, trainable=False), eos)
    ids, mask = _prompts(tokenizer)
    with torch.no_grad():
        ended_at_once = decode(model, ids, mask, 10, eos, pad, greedy=True)
        held = decode(model, ids, mask, 10, eos, pad, temperature=1.0, min_new_tokens=3)
    assert ended_at_once.tolist() == [[eos]] * 3  # every row ended: no further step
    assert held.shape == (3, 4)
    assert (held[:, :3] != eos).all() and (held[:, 3] == eos).all()


def test_decode_pads_a_row_after_its_eos(tiny_model):
    """Rows that end early get pad while the others go on (the EOS bonus only for the first row)."""
    tokenizer = load_tokenizer(tiny_model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    inner = load_causal_lm(tiny_model, CPU, trainable=False)

    class FirstRowEnds(_EosLover):
        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits[0, :, self.eos_id] += 100.0
            out.logits[1:, :, self.eos_id] -= 100.0
            return out

    ids, mask = _prompts(tokenizer)
    with torch.no_grad():
        response = decode(FirstRowEnds(inner, eos), ids, mask, 5, eos, pad, greedy=True)
    assert response.shape == (3, 5)
    assert response[0, 0] == eos and (response[0, 1:] == pad).all()
    assert (response[1:] != eos).all()


def test_bf16_linears_give_the_autocast_numbers(tiny_model):
    """Storing a frozen model's Linear weights in bf16 changes nothing under autocast; the tied LM head and
    the embeddings stay float32."""
    tokenizer = load_tokenizer(tiny_model)
    plain = load_causal_lm(tiny_model, CPU, trainable=False)
    stored = load_causal_lm(tiny_model, CPU, trainable=False, bf16_linears=True)
    assert stored.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert stored.lm_head.weight.dtype == stored.model.embed_tokens.weight.dtype == torch.float32
    ids, mask = _prompts(tokenizer)
    with torch.no_grad(), autocast(CPU, True):
        a = plain(input_ids=ids, attention_mask=mask).logits
        b = stored(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="frozen"):
        linears_to_bf16(load_causal_lm(tiny_model, CPU, trainable=True))


def test_attention_kernel_choice_agrees_and_applies_to_short_bf16_cpu_sequences_only(tiny_model, monkeypatch):
    """On an AMX CPU eager short bf16 passes take the math kernel; elsewhere our loaders' flash forward."""
    monkeypatch.setattr(fast_compile, "eager_flash", lambda: False)
    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, CPU, trainable=False)
    ids, mask = _prompts(tokenizer)
    with torch.no_grad():
        default = model(input_ids=ids, attention_mask=mask).logits
        with attention_for_width(CPU, ids.shape[1], bf16=True):
            chosen = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(default, chosen, atol=1e-5)
    assert not isinstance(attention_for_width(CPU, ids.shape[1], bf16=True), contextlib.nullcontext)
    assert isinstance(attention_for_width(CPU, ids.shape[1], bf16=False), contextlib.nullcontext)
    assert isinstance(attention_for_width(CPU, 10_000, bf16=True), contextlib.nullcontext)
    assert isinstance(attention_for_width(torch.device("cuda"), 64, bf16=True), contextlib.nullcontext)
    monkeypatch.setattr(fast_compile, "eager_flash", lambda: True)
    assert isinstance(attention_for_width(CPU, ids.shape[1], bf16=True), contextlib.nullcontext)


def test_without_amx_every_eager_bf16_pass_runs_the_same_flash_forward(tiny_model, monkeypatch):
    """Without AMX, scoring (no grad) and training (grad) passes both take `masked_attention`'s flash forward, so a
    frozen reference and a trainable policy with the same weights give the same logits bit for bit (KL 0 at the
    start), and the training pass's gradients match the math kernel's to bf16 rounding."""
    monkeypatch.setattr(fast_compile, "eager_flash", lambda: True)
    calls = []
    real = fast_compile.masked_attention
    monkeypatch.setattr(fast_compile, "masked_attention", lambda *args: calls.append(1) or real(*args))
    tokenizer = load_tokenizer(tiny_model)
    policy, reference = load_causal_lm(tiny_model, CPU), load_causal_lm(tiny_model, CPU, trainable=False)
    ids, mask = _prompts(tokenizer)
    with autocast(CPU, True):
        with torch.no_grad():
            frozen = reference(input_ids=ids, attention_mask=mask).logits
        trained = policy(input_ids=ids, attention_mask=mask).logits
    assert calls and torch.equal(frozen, trained)
    trained.float().square().mean().backward()
    ours = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    monkeypatch.setattr(fast_compile, "eager_flash", lambda: False)
    with autocast(CPU, True), attention_for_width(CPU, ids.shape[1], True):
        policy(input_ids=ids, attention_mask=mask).logits.float().square().mean().backward()
    for mine, math in zip(ours, (p.grad for p in policy.parameters())):
        assert torch.nn.functional.cosine_similarity(mine.flatten(), math.flatten(), dim=0) > 0.99


def _saved_bytes(model, ids, mask) -> tuple[int, torch.Tensor]:
    """Bytes of the activations autograd keeps for backward (parameters excluded), and the logits."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in parameters:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast(CPU, True):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return sum(storages.values()), logits


def test_norm_outputs_cast_once_same_forward_fewer_saved_activations(tiny_model):
    """The same logits under autocast, fewer activations kept, and gradients as far from fp32's as autocast's own
    (relative error ~0.5-0.9% on both, measured here)."""
    from transformers import AutoModelForCausalLM

    from rlhf.fast import cast_norm_outputs_once

    tokenizer = load_tokenizer(tiny_model)
    fp32, plain, hooked = (AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32) for _ in range(3))
    assert cast_norm_outputs_once(hooked) == 2 * hooked.config.num_hidden_layers  # not the final norm
    ids, mask = _prompts(tokenizer)
    plain_bytes, plain_logits = _saved_bytes(plain, ids, mask)
    hooked_bytes, hooked_logits = _saved_bytes(hooked, ids, mask)
    assert torch.equal(plain_logits, hooked_logits)
    assert hooked_bytes < plain_bytes
    fp32(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).sum().backward()
    plain_logits.float().logsumexp(-1).sum().backward()
    hooked_logits.float().logsumexp(-1).sum().backward()
    for (name, truth), a, b in zip(fp32.named_parameters(), plain.parameters(), hooked.parameters()):
        scale = truth.grad.norm()
        plain_error, hooked_error = (a.grad - truth.grad).norm() / scale, (b.grad - truth.grad).norm() / scale
        assert hooked_error <= 1.5 * plain_error + 1e-3, (name, plain_error.item(), hooked_error.item())
    with torch.no_grad():  # outside autocast the hooks do nothing
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                           hooked(input_ids=ids, attention_mask=mask).logits)


def test_rollouts_sampled_apart_join_with_the_same_log_probs(tiny_model):
    """`rollout.concatenate` (dynamic sampling's rounds): wider padding on the left of the prompts and the right of
    the answers leaves every answer's log-probabilities as they were."""
    from rlhf import ppo
    from rlhf.rollout import concatenate, sample

    model, tokenizer = load_causal_lm(tiny_model, CPU), load_tokenizer(tiny_model)
    torch.manual_seed(0)
    short, long = sample(model, tokenizer, PROMPTS[:1], 3, bf16=False), sample(model, tokenizer, PROMPTS[1:], 9,
                                                                               bf16=False)
    joined = concatenate([short, long], tokenizer.pad_token_id)
    width = short.response_ids.shape[1]
    assert joined.texts == short.texts + long.texts
    assert joined.ended.tolist() == short.ended.tolist() + long.ended.tolist()
    assert joined.prompt_ids.shape[1] == long.prompt_ids.shape[1]
    assert joined.response_ids.shape[1] == max(width, long.response_ids.shape[1])
    with torch.no_grad():
        apart = [ppo.response_logprobs_values(model, None, r, 0.7, False, CPU)[0] for r in (short, long)]
        together = ppo.response_logprobs_values(model, None, joined, 0.7, False, CPU)[0]
    assert torch.equal(joined.response_mask[0, :width], short.response_mask[0])
    assert not joined.response_mask[0, width:].any()
    assert torch.allclose(together[0, :width][short.response_mask[0]], apart[0][0][short.response_mask[0]], atol=1e-5)
    assert torch.allclose(together[1:, :long.response_ids.shape[1]][long.response_mask], apart[1][long.response_mask],
                          atol=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_answers_to_one_prompt_read_it_once_with_the_numbers_of_one_row_each(tiny_model, monkeypatch, lora):
    """`ppo.shared_prompt_packing`: a group's answers packed behind one copy of their prompt give each answer token
    the log-probability, value and entropy it has in its own row, and the same gradients."""
    from rlhf import ppo
    from rlhf.models import add_lora
    from rlhf.rollout import sample

    model, tokenizer = load_causal_lm(tiny_model, CPU), load_tokenizer(tiny_model)
    if lora:
        model = add_lora(model, r=4, alpha=8)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter count
                torch.nn.init.normal_(p, std=0.5)
    torch.manual_seed(0)
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    # three answers to the first prompt, two to the second, one to the third; lengths vary (EOS or the limit)
    rollout = sample(model, tokenizer, [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]], 12, temperature=1.5,
                     bf16=False)
    assert rollout.lengths.unique().numel() > 1
    packing = ppo.shared_prompt_packing(model, rollout)
    assert packing is not None and [len(answers) for _, answers in packing[0]] == [3, 2, 1]  # one row per prompt
    assert sorted(packing[1]) == list(range(6))

    def forward():
        model.zero_grad(set_to_none=True)
        value_head.zero_grad(set_to_none=True)
        logprobs, values, entropy = ppo.response_logprobs_values(model, value_head, rollout, 0.7, False, CPU,
                                                                 want_entropy=True)
        mask = rollout.response_mask
        (logprobs[mask].sum() + values[mask].pow(2).sum()).backward()
        grads = {k: p.grad.clone() for k, p in [*model.named_parameters(), *value_head.named_parameters()]
                 if p.grad is not None}
        return logprobs.detach(), values.detach(), entropy, grads

    packed = forward()
    monkeypatch.setattr(ppo, "shared_prompt_packing", lambda *args, **kwargs: None)
    plain = forward()
    mask = rollout.response_mask
    for got, want in zip(packed[:3], plain[:3]):
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(got).all()
    assert packed[3].keys() == plain[3].keys() and len(plain[3]) > 2
    for name, grad in plain[3].items():
        torch.testing.assert_close(packed[3][name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_one_answer_per_prompt_is_not_packed(tiny_model):
    from rlhf import ppo
    from rlhf.models import packed_width
    from rlhf.rollout import sample

    model, tokenizer = load_causal_lm(tiny_model, CPU), load_tokenizer(tiny_model)
    torch.manual_seed(0)
    assert ppo.shared_prompt_packing(model, sample(model, tokenizer, PROMPTS, 6, bf16=False)) is None
    grouped = sample(model, tokenizer, PROMPTS * 4, 6, bf16=False)
    assert ppo.shared_prompt_packing(model, grouped) is not None
    # the cap: a packed row grows no wider than the cap or the unpacked width, whichever is larger
    capped = ppo.shared_prompt_packing(model, grouped, max_width=1)
    assert capped is None or packed_width(capped[0]) <= grouped.input_ids.shape[1]
    assert packed_width(ppo.shared_prompt_packing(model, grouped)[0]) > grouped.input_ids.shape[1]


def test_an_opening_is_prefilled_then_sampled_on_and_starts_the_text(tiny_model):
    """`sample(openings=...)`: the opening's tokens follow the assistant header as prompt ids, the answer goes on
    from them (greedy: as if the opening had been typed into the prompt), and the text starts with the opening."""
    from rlhf.rollout import sample

    model, tokenizer = load_causal_lm(tiny_model, CPU, trainable=False), load_tokenizer(tiny_model)
    openings = ["", "I can't help with", "I don't know"]
    opened = sample(model, tokenizer, PROMPTS, 5, greedy=True, bf16=False, openings=openings)
    plain = sample(model, tokenizer, PROMPTS[:1], 5, greedy=True, bf16=False)
    assert opened.texts[0] == plain.texts[0]
    for row, (prompt, opening) in enumerate(zip(PROMPTS, openings)):
        assert opened.texts[row].startswith(opening)
        expected = encode_prompt(tokenizer, prompt) + tokenizer.encode(opening, add_special_tokens=False)
        assert opened.prompt_ids[row][opened.prompt_mask[row].bool()].tolist() == expected
        ids = torch.tensor([expected])
        with torch.no_grad():
            continuation = decode(model, ids, torch.ones_like(ids, dtype=torch.bool), 5, [], tokenizer.pad_token_id,
                                  1.0, 1.0, True, 0)
        assert opened.response_ids[row][opened.response_mask[row].bool()].tolist() == \
            continuation[0][:int(opened.response_mask[row].sum())].tolist()
    with pytest.raises(ValueError, match="one per prompt"):
        sample(model, tokenizer, PROMPTS, 2, bf16=False, openings=["x"])
