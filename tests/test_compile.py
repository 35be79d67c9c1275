"""`compile: true`: decoder layers compiled with torch.compile give the eager numbers; `decode` runs a compiled
model's layers eager, and PPO's rollouts take compiled decode steps (`LayerStackDecoder(compiled=True)`)."""

import json

import pytest
import torch
from test_stages import DEMOS, PROMPTS, changed, pairs_file, reward_dir, weights  # noqa: F401  (pytest fixtures)

from rlhf import ppo, sft
from rlhf.data import position_ids_from_mask
from rlhf.fast import attention_for_width, compile_layers
from rlhf.fast import compile as fast_compile
from rlhf.hardware import autocast
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.rollout import decode

pytestmark = pytest.mark.compile


def test_compiled_layers_give_the_eager_logits_gradients_and_tokens(tiny_model):
    cpu = torch.device("cpu")
    eager, compiled = load_causal_lm(tiny_model, cpu), load_causal_lm(tiny_model, cpu)
    assert compile_layers(compiled) == 2  # the tiny model's two decoder layers
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]])
    mask = (torch.arange(7) >= torch.tensor([[2], [0]])).long()
    grads = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        grads[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    (eager_logits, eager_grads), (compiled_logits, compiled_grads) = grads["eager"], grads["compiled"]
    assert torch.allclose(eager_logits, compiled_logits, atol=1e-5)
    for name, grad in eager_grads.items():
        assert torch.allclose(grad, compiled_grads[name], atol=1e-5), name
    # decoding runs the compiled model eager (a KV cache would compile once per layer) and picks the same tokens
    tokenizer = load_tokenizer(tiny_model)
    with torch.no_grad():
        tokens = [decode(m, ids, mask, 6, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
                  for m in (eager, compiled)]
    assert torch.equal(tokens[0], tokens[1])


def test_compiled_bf16_layers_take_our_attention_and_agree_with_eager(tiny_model, monkeypatch, tmp_path):
    """Under bf16 autocast on CPU a compiled layer's attention is `masked_attention` (flash forward, our
    backward): the logits and gradients agree with the eager (math kernel) pass to bf16 rounding, a compiled
    reference gives the compiled policy's logits exactly (KL 0 at the start), and a saved model names plain SDPA."""
    torch._dynamo.reset()  # trace afresh, so that the spy below sees the attention the graphs are built from
    traced = []
    real = fast_compile.masked_attention
    monkeypatch.setattr(fast_compile, "masked_attention", lambda *args: traced.append(args[0].shape) or real(*args))
    cpu = torch.device("cpu")
    eager, compiled = load_causal_lm(tiny_model, cpu), load_causal_lm(tiny_model, cpu)
    reference = load_causal_lm(tiny_model, cpu, trainable=False, bf16_linears=True)
    compile_layers(compiled, reference)
    assert compiled.config._attn_implementation == reference.config._attn_implementation == "rlhf_sdpa"
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]])
    mask = (torch.arange(7) >= torch.tensor([[2], [0]])).long()
    results = {}
    for name, model in (("eager", eager), ("compiled", compiled), ("reference", reference)):
        with torch.set_grad_enabled(name != "reference"), autocast(cpu, True), attention_for_width(cpu, 7, True):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False).logits.float()
        if name != "reference":
            logits.logsumexp(-1)[mask.bool()].mean().backward()
        results[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert traced, "the compiled layers did not trace masked_attention"
    (eager_logits, eager_grads), (compiled_logits, compiled_grads) = results["eager"], results["compiled"]
    real_rows = mask.bool()
    assert torch.allclose(eager_logits[real_rows], compiled_logits[real_rows], atol=0.05, rtol=0.02)
    for name, grad in eager_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), compiled_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)
    assert torch.equal(results["reference"][0], compiled_logits)
    # no padding: transformers passes no mask (causal attention), which we build
    traced.clear()
    with torch.no_grad(), autocast(cpu, True), attention_for_width(cpu, 7, True):
        unpadded = [m(input_ids=ids[1:], use_cache=False).logits.float() for m in (eager, compiled)]
    assert traced and torch.allclose(unpadded[0], unpadded[1], atol=0.05, rtol=0.02)
    compiled.save_pretrained(tmp_path / "saved")
    assert "rlhf_sdpa" not in (tmp_path / "saved" / "config.json").read_text()


def test_ppo_with_compiled_layers_starts_as_the_eager_run(tiny_model, reward_dir, write_jsonl, tmp_path):  # noqa: F811  (the fixture)
    """Four models, all compiled: the first iteration (sampled with compiled decode steps, scored and trained
    compiled) logs the eager run's numbers, and the policy saves as a plain model."""
    prompts = write_jsonl("prompts.jsonl", PROMPTS)
    first_rows = {}
    for compiled in (False, True):
        out = tmp_path / f"ppo_{compiled}"
        ppo.main(ppo.Config(policy=str(tiny_model), reward_model=str(reward_dir), data=str(prompts),
                            output_dir=str(out), steps=2, batch_size=4, mini_batch_size=4, ppo_epochs=1,
                            max_new_tokens=8, lr=1e-3, value_lr=1e-3, critic="model", compile=compiled, bf16=False,
                            gold=False, monitor_every=0))
        first_rows[compiled] = json.loads(
            (tmp_path / f"ppo_{compiled}_logs" / "metrics.jsonl").read_text().splitlines()[0])
        assert changed(weights(tiny_model), weights(out))
    for key in ("score", "kl", "entropy", "policy_loss", "value_loss", "returns", "response_length"):
        assert abs(first_rows[True][key] - first_rows[False][key]) < 1e-4, key


def test_sft_with_lora_and_compiled_layers_saves_a_plain_model(tiny_model, write_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl("demos.jsonl", DEMOS)
    out = tmp_path / "sft"
    summary = sft.main(sft.Config(model=str(tiny_model), data=str(data), output_dir=str(out), epochs=1.0, batch_size=2,
                                  lr=1e-2, lora_r=4, compile=True, bf16=True))
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert changed(weights(tiny_model), weights(out))
