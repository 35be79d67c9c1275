"""`rlhf dpo` for two steps on a tiny random model: the policy moves, the reference does not; bad pairs."""

import gc
import json
import math
import weakref

import pytest
import torch
from safetensors.torch import load_file

from rlhf import cli, dpo
from rlhf.data import DataError, encode_prompt, encode_response
from rlhf.models import load_causal_lm, load_tokenizer

PAIRS = [{"prompt": f"Explain {t} to a 10-year-old.", "chosen": f"A short clear answer about {t}.",
          "rejected": f"{t} {t} {t} is a thing that never ends and"}
         for t in ["rain", "wind", "snow", "the sun", "the moon", "clouds"]]
# the same kind of pair in the conversational form
CHAT_PAIR = {"prompt": [{"role": "user", "content": "Explain rivers to a 10-year-old."}],
             "chosen": [{"role": "assistant", "content": "A river is water that flows downhill to the sea."}],
             "rejected": [{"role": "assistant", "content": "rivers rivers rivers"}]}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out.parent / f"{out.name}_logs" / "metrics.jsonl").read_text().splitlines()]


def run(tiny_model, data, out, **overrides) -> dict:
    settings = dict(model=str(tiny_model), data=str(data), output_dir=str(out), batch_size=2, eval_fraction=0.0,
                    lr=1e-3, bf16=False)
    return dpo.main(dpo.Config(**{**settings, **overrides}))


def spy_loads(monkeypatch, weak: bool = False) -> list:
    """(model, its weights at load time) for every model dpo.main loads; a weak reference with weak=True."""
    loaded = []
    real = dpo.load_causal_lm

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded.append((weakref.ref(model) if weak else model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(dpo, "load_causal_lm", load)
    return loaded


@pytest.mark.parametrize("lora_r", [0, 4])
def test_two_steps_change_the_policy_not_the_reference(tiny_model, write_jsonl, tmp_path, monkeypatch, lora_r):
    data = write_jsonl("pairs.jsonl", PAIRS[:4] + [CHAT_PAIR])
    loaded = spy_loads(monkeypatch)
    out = tmp_path / "dpo"
    summary = run(tiny_model, data, out, eval_fraction=0.2, lr=1e-2 if lora_r else 1e-3, lora_r=lora_r)
    assert summary["steps"] == 2 and summary["train_pairs"] == 4 and summary["eval_pairs"] == 1
    rows = metrics(out)
    assert len(rows) == 3  # two steps, then the held-out evaluation
    for key in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logprobs",
                "rejected_logprobs", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows[:2]), key
    # policy = reference at the first step: h = 0 on any batch, the loss is log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert 0.0 <= rows[2]["eval_accuracy"] <= 1.0 and math.isfinite(rows[2]["eval_margin"])
    assert summary["first"]["loss"] == rows[0]["loss"]
    # the trained policy changed; the frozen reference did not
    assert any(not torch.equal(a, b) for a, b in zip(weights(tiny_model).values(), weights(out).values()))
    (policy, before), *frozen = loaded
    assert len(frozen) == (0 if lora_r else 1)
    for model, frozen_before in frozen:
        assert not any(p.requires_grad for p in model.parameters())
        assert all(torch.equal(frozen_before[k], v) for k, v in model.state_dict().items())
    if lora_r:  # the reference is the base weights with the adapter off: they must be untouched
        base = {k.replace(".base_layer", ""): v for k, v in policy.state_dict().items() if "lora_" not in k}
        assert base.keys() == before.keys()
        assert all(torch.equal(before[k], base[k]) for k in before)
    else:
        assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    config = json.loads((out / "rlhf_config.json").read_text())
    assert config["loss"] == "dpo" and config["lora_r"] == lora_r
    assert not (out / "adapter_config.json").exists()


def test_training_on_one_pair_lowers_its_loss(tiny_model, write_jsonl, tmp_path):
    out = tmp_path / "one"
    run(tiny_model, write_jsonl("pairs.jsonl", PAIRS[:1]), out, batch_size=1, epochs=3.0, warmup_ratio=0.0)
    rows = metrics(out)[:3]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["loss"] > rows[1]["loss"] > rows[2]["loss"]
    assert rows[2]["margin"] > 0 and rows[2]["accuracy"] == 1.0
    assert (rows[2]["chosen_logprobs"] - rows[2]["rejected_logprobs"]
            > rows[0]["chosen_logprobs"] - rows[0]["rejected_logprobs"])


def test_precompute_reference_frees_the_reference_before_training(tiny_model, write_jsonl, tmp_path, monkeypatch):
    data = write_jsonl("pairs.jsonl", PAIRS[:4])
    loaded = spy_loads(monkeypatch, weak=True)
    real_pair_logprobs = dpo.pair_logprobs
    calls = []

    def pair_logprobs(model, *args, **kwargs):
        if torch.is_grad_enabled():  # a training forward: the reference must be gone by now
            gc.collect()
            calls.append(loaded[1][0]() is None)
        return real_pair_logprobs(model, *args, **kwargs)

    monkeypatch.setattr(dpo, "pair_logprobs", pair_logprobs)
    out = tmp_path / "pre"
    summary = run(tiny_model, data, out, precompute_reference=True)
    assert len(loaded) == 2 and calls == [True, True]
    assert summary["precompute_reference"]
    # the same first loss as computing the reference on the fly: log 2 (fp32, policy = reference)
    assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_reference_from_another_folder(tiny_model, write_jsonl, tmp_path):
    """A different reference: h ≠ 0 from the first step, and the loss matches a direct computation."""
    from rlhf.models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    data = write_jsonl("pairs.jsonl", PAIRS[:2])
    out = tmp_path / "dpo"
    run(tiny_model, data, out, reference=str(other), epochs=0.5)
    tokenizer = load_tokenizer(tiny_model)
    pairs = [(encode_prompt(tokenizer, [{"role": "user", "content": p["prompt"]}]),
              encode_response(tokenizer, p["chosen"]), encode_response(tokenizer, p["rejected"])) for p in PAIRS[:2]]
    device = torch.device("cpu")
    with torch.no_grad():
        lp, _ = dpo.pair_logprobs(load_causal_lm(tiny_model, device), pairs, tokenizer.pad_token_id, device, False)
        ref, _ = dpo.pair_logprobs(load_causal_lm(other, device), pairs, tokenizer.pad_token_id, device, False)
    h = (lp[:2] - ref[:2]) - (lp[2:] - ref[2:])
    expected = -torch.nn.functional.logsigmoid(0.1 * h).mean().item()
    assert abs(expected - math.log(2)) > 1e-3
    assert metrics(out)[0]["loss"] == pytest.approx(expected, abs=1e-5)


def test_pair_logprobs_sums_answer_tokens_only(tiny_model):
    """Against a plain full-logits computation: the answer tokens (with EOS) only, whatever the padding."""
    tokenizer = load_tokenizer(tiny_model)
    device = torch.device("cpu")
    model = load_causal_lm(tiny_model, device)
    pairs = [([1, 5, 9, 4], [7, 8, 2], [6, 2]), ([3, 5], [10, 11, 12, 13, 2], [2])]
    with torch.no_grad():
        got, n = dpo.pair_logprobs(model, pairs, tokenizer.pad_token_id, device, False)
        expected = []
        for prompt, answer in [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]:
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            expected.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer)))
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=0)
    assert n.tolist() == [3, 5, 2, 1]


@pytest.mark.parametrize("loss", ["ipo", "cdpo", "simpo"])
def test_variants_run(tiny_model, write_jsonl, tmp_path, monkeypatch, loss):
    data = write_jsonl("pairs.jsonl", PAIRS[:2])
    loaded = spy_loads(monkeypatch)
    out = tmp_path / loss
    summary = run(tiny_model, data, out, loss=loss, epochs=1.0)
    row = metrics(out)[0]
    assert summary["steps"] == 1 and math.isfinite(row["loss"])
    if loss == "simpo":
        assert len(loaded) == 1  # reference-free: no second model
        assert summary["reference"].startswith("none")
    else:
        assert len(loaded) == 2
        assert row["margin"] == pytest.approx(0.0, abs=1e-6)
        expected = 25.0 if loss == "ipo" else math.log(2)  # h = 0: (0 - 1/(2·0.1))², or log 2
        assert row["loss"] == pytest.approx(expected, abs=1e-5)


def test_identical_and_empty_pairs_are_skipped_and_counted(tiny_model, write_jsonl, tmp_path):
    rows = PAIRS[:3] + [
        {"prompt": "Explain ice.", "chosen": "Ice is frozen water.", "rejected": "Ice is frozen water."},
        {"prompt": "Explain fog.", "chosen": "Fog is a cloud on the ground.",
         "rejected": "  Fog is a cloud on the ground. "},
        {"prompt": "Explain hail.", "chosen": "", "rejected": "Hail is ice falling."},
        {"prompt": "Explain dew.", "chosen": "Dew is water on grass.", "rejected": "   "},
    ]
    summary = run(tiny_model, write_jsonl("pairs.jsonl", rows), tmp_path / "dpo")
    assert summary["skipped_identical"] == 2 and summary["skipped_empty"] == 2
    assert summary["train_pairs"] == 3


def test_pairs_identical_after_truncation_are_skipped(tiny_model, write_jsonl, tmp_path):
    same = "Rain is water that falls from the clouds when the drops get heavy enough to fall down " * 3
    rows = PAIRS[:2] + [{"prompt": "Explain rain.", "chosen": same + "yes.", "rejected": same + "no."}]
    summary = run(tiny_model, write_jsonl("pairs.jsonl", rows), tmp_path / "dpo", max_length=48)
    assert summary["skipped_identical"] == 1 and summary["train_pairs"] == 2


def test_no_usable_pairs_is_an_error(tiny_model, write_jsonl, tmp_path):
    rows = [{"prompt": "Explain ice.", "chosen": "Same.", "rejected": "Same."}]
    with pytest.raises(ValueError, match="no usable pairs.*1 identical"):
        run(tiny_model, write_jsonl("pairs.jsonl", rows), tmp_path / "dpo")


def test_a_file_with_neither_form_names_the_line_and_the_fields(tiny_model, write_jsonl, tmp_path):
    rows = [PAIRS[0], {"question": "Explain rain.", "good": "Rain falls.", "bad": "rain rain"}]
    with pytest.raises(DataError, match=r"pairs\.jsonl, line 2, field 'prompt'.*fields present: bad, good, question"
                                        r".*\"prompt\": \.\.\., \"chosen\": \.\.\., \"rejected\""):
        run(tiny_model, write_jsonl("pairs.jsonl", rows), tmp_path / "dpo")
    rows = [PAIRS[0], {"prompt": "Explain rain.", "chosen": {"text": "Rain falls."}, "rejected": "rain"}]
    with pytest.raises(DataError, match=r"line 2, field 'chosen'"):
        run(tiny_model, write_jsonl("pairs.jsonl", rows), tmp_path / "dpo")


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="'loss' must be one of dpo, ipo, cdpo, simpo, got 'kto'"):
        dpo.main(dpo.Config(loss="kto"))


def test_cli_help_and_run(tiny_model, write_jsonl, tmp_path, capsys):
    assert cli.main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--precompute_reference" in text and "--simpo_gamma" in text
    data = write_jsonl("pairs.jsonl", PAIRS[:2])
    out = tmp_path / "cli"
    code = cli.main(["dpo", "--model", str(tiny_model), "--data", str(data), "--output_dir", str(out),
                     "--batch_size", "2", "--eval_fraction", "0", "--bf16", "false"])
    assert code == 0 and (out / "rlhf_summary.json").is_file()
    assert cli.main(["dpo", "--los", "ipo"]) == 2
    assert "Did you mean 'loss'?" in capsys.readouterr().err
