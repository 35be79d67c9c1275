"""`LayerStackDecoder`, the per-token forward pass of sampling, against the model's own forward pass: tiny random
Llama and Qwen2 models built here, left-padded prompts of different lengths, teacher-forced tokens."""

import pytest
import torch

from rlhf.data import position_ids_from_mask
from rlhf.fast import decoder, linears_to_bf16
from rlhf.fast.decoder import LayerStackDecoder, covers
from rlhf.hardware import autocast
from rlhf.rollout import decode

CPU = torch.device("cpu")
EOS, PAD = 1, 0


def _model(kind: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, pad_token_id=PAD,
                 initializer_range=0.2)  # larger than the default 0.02: logits that differ between tokens
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True, **extra))
    else:  # Qwen2: biases on q, k and v, an untied head
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False, **extra))
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):  # zero-initialised: give Qwen2's biases something to do
            torch.nn.init.normal_(parameter, std=0.5)
    return model.eval()


def _prompts():
    torch.manual_seed(1)
    ids = torch.randint(2, 97, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of different widths, as `pad_left` makes
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _teacher_forced(model, ids, mask, continuation, bf16: bool, compiled: bool = False):
    """Logits (B, steps+1, V) after the prompt and after each forced token: ours, and the model's full forward."""
    with torch.no_grad(), autocast(CPU, bf16):
        stepper = LayerStackDecoder(model, mask, continuation.shape[1], compiled=compiled)
        ours = [stepper.prefill(ids)] + [stepper.step(token) for token in continuation.T]
        full_ids = torch.cat([ids, continuation], 1)
        full_mask = torch.cat([mask, torch.ones_like(continuation)], 1)
        theirs = model(input_ids=full_ids, attention_mask=full_mask,
                       position_ids=position_ids_from_mask(full_mask)).logits[:, ids.shape[1] - 1:]
    return torch.stack(ours, 1).float(), theirs.float()


@pytest.mark.parametrize("kind, extra", [("llama", {}), ("qwen2", {}),
                                         ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})])
@pytest.mark.parametrize("packed", [True, False], ids=["oneDNN-packed", "F.linear"])
def test_fp32_logits_equal_the_models_forward(kind, extra, packed, monkeypatch):
    """On CPU the weights go to oneDNN pre-packed; elsewhere (CUDA) through F.linear: both paths checked here."""
    if not packed:
        monkeypatch.setattr(decoder, "_packs_for_cpu", lambda device, dtype: False)
    model = _model(kind, **extra)
    assert covers(model)
    ids, mask = _prompts()
    continuation = torch.randint(2, 97, (3, 5), generator=torch.Generator().manual_seed(2))
    ours, theirs = _teacher_forced(model, ids, mask, continuation, bf16=False)
    assert theirs.abs().max() > 1.0  # logits far from flat
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_bf16_logits_within_the_autocast_rounding():
    """Under autocast the matmuls run in bf16 in both, with casts in slightly different places (the KV cache, the
    attention inputs), so they agree to within what bf16 itself moves the fp32 logits."""
    model = _model("qwen2")
    ids, mask = _prompts()
    continuation = torch.randint(2, 97, (3, 5), generator=torch.Generator().manual_seed(3))
    ours, theirs = _teacher_forced(model, ids, mask, continuation, bf16=True)
    _, exact = _teacher_forced(model, ids, mask, continuation, bf16=False)
    rounding = (theirs - exact).abs().max()
    assert rounding > 0
    assert (ours - theirs).abs().max() <= 3 * rounding


@pytest.mark.parametrize("packed", [True, False], ids=["oneDNN-packed", "F.linear"])
@pytest.mark.compile
def test_compiled_steps_equal_the_models_forward(packed, monkeypatch):
    """Compiled decode steps (whole cache attended, unwritten slots masked, the packed matmul as our own operator):
    fp32 logits equal the model's forward; in bf16, within what bf16 moves the fp32 logits."""
    if not packed:
        monkeypatch.setattr(decoder, "_packs_for_cpu", lambda device, dtype: False)
    model = _model("qwen2")
    ids, mask = _prompts()
    continuation = torch.randint(2, 97, (3, 5), generator=torch.Generator().manual_seed(5))
    ours, theirs = _teacher_forced(model, ids, mask, continuation, bf16=False, compiled=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    if packed:
        ours_bf16, theirs_bf16 = _teacher_forced(model, ids, mask, continuation, bf16=True, compiled=True)
        assert (ours_bf16 - theirs_bf16).abs().max() <= 3 * (theirs_bf16 - theirs).abs().max()


@pytest.mark.compile
def test_compiled_decoder_compiles_once_per_cache_bucket():
    """Prompts of another width and another rollout of the same batch size reuse the compiled step; the cache is
    the prompt plus the answer rounded up to `CAPACITY_STEP` slots."""
    from torch._dynamo.utils import counters

    model = _model("llama")
    ids, mask = _prompts()
    with torch.no_grad():
        first = decode(model, ids, mask, 6, EOS, PAD, greedy=True, compiled=True)
        compiled_frames = counters["frames"]["ok"]
        assert compiled_frames >= 1
        wider = torch.cat([torch.full((3, 4), PAD), ids], 1), torch.cat([torch.zeros(3, 4, dtype=mask.dtype), mask], 1)
        again = decode(model, *wider, 6, EOS, PAD, greedy=True, compiled=True)
        assert counters["frames"]["ok"] == compiled_frames  # nothing compiled again
        assert torch.equal(first, again)  # more left padding changes nothing
        assert torch.equal(first, decode(model, ids, mask, 6, EOS, PAD, greedy=True))  # the eager steps' tokens
        stepper = LayerStackDecoder(model, mask, 60, compiled=True)
    assert stepper.keys[0].shape[2] == 2 * decoder.CAPACITY_STEP  # 7 + 60 slots, rounded up


def test_greedy_decode_gives_the_models_tokens():
    """The whole loop, fast path against the model with transformers' cache: same tokens, fp32 and frozen bf16."""
    model = _model("llama")
    ids, mask = _prompts()
    with torch.no_grad():
        fast = decode(model, ids, mask, 10, EOS, PAD, greedy=True)
        plain = decode(model, ids, mask, 10, EOS, PAD, greedy=True, fast=False)
    assert fast.shape == (3, 10)
    assert torch.equal(fast, plain)
    linears_to_bf16(model.requires_grad_(False))  # frozen with bf16 Linears, as `rlhf eval` loads a model
    with torch.no_grad(), autocast(CPU, True):
        fast = decode(model, ids, mask, 10, EOS, PAD, greedy=True)
        plain = decode(model, ids, mask, 10, EOS, PAD, greedy=True, fast=False)
    assert (fast == plain).float().mean() > 0.8  # a near tie may break the other way in bf16


def _lora(model, **extra):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"], **extra)
    lora = get_peft_model(model, config)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:  # zero at the start: give the adapter something to add
            torch.nn.init.normal_(parameter, std=0.3)
    return lora.eval()


def test_lora_is_read_merged_and_switched_off_for_the_reference():
    """A peft LoRA model: the decoder reads base weight + B·A·scale; with the adapter off (PPO's reference,
    `adapter_disabled`), the base weights alone. Both equal peft's own forward in fp32."""
    from rlhf.models import adapter_disabled

    lora = _lora(_model("llama"))
    assert covers(lora)
    ids, mask = _prompts()
    continuation = torch.randint(2, 97, (3, 5), generator=torch.Generator().manual_seed(4))
    ours, theirs = _teacher_forced(lora, ids, mask, continuation, bf16=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with adapter_disabled(lora):
        ours_off, theirs_off = _teacher_forced(lora, ids, mask, continuation, bf16=False)
    torch.testing.assert_close(ours_off, theirs_off, atol=1e-4, rtol=1e-4)
    assert (ours - ours_off).abs().max() > 0.1  # the adapter changes the logits: both cases are tested


def test_models_it_does_not_cover_use_their_own_forward():
    dora = _lora(_model("llama"), use_dora=True)
    assert not covers(dora)
    assert not covers(_lora(_model("llama"), lora_bias=True))
    assert not covers(_model("qwen2", use_sliding_window=True, sliding_window=4))
    assert not covers(_model("llama", hidden_act="gelu"))
    ids, mask = _prompts()
    with torch.no_grad():  # the DoRA model decodes through its own forward: the same tokens either way
        assert torch.equal(decode(dora, ids, mask, 6, EOS, PAD, greedy=True),
                           decode(dora, ids, mask, 6, EOS, PAD, greedy=True, fast=False))
