"""The steppable stages (`training` generators) and the shortcuts their steps take, on a tiny random model."""

import json

import pytest
import torch

from rlhf import dpo, reward, sft
from rlhf.data import encode_conversation, encode_prompt, encode_response, pad_right
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.ops import logprobs_from_logits

DEMOS = [{"prompt": f"Explain {t} to a 10-year-old.", "completion": f"{t.capitalize()} is {a}."}
         for t, a in [("rain", "water from clouds"), ("wind", "air that moves from place to place"),
                      ("snow", "frozen rain made of tiny ice crystals that fall slowly"), ("the sun", "a star")]]
PAIRS = [{"prompt": d["prompt"], "chosen": d["completion"],
          "rejected": f"{d['completion']} {d['completion']} and so on"} for d in DEMOS]


def run_to_end(steps) -> tuple[list[dict], dict]:
    """Every yielded step, and the generator's return value."""
    yielded = []
    while True:
        try:
            yielded.append(next(steps))
        except StopIteration as finished:
            return yielded, finished.value


def test_sft_training_yields_each_step_and_its_loss_is_the_full_logits_loss(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl("demos.jsonl", DEMOS)
    out = tmp_path / "sft"
    config = sft.Config(model=str(tiny_model), data=str(data), output_dir=str(out), epochs=2.0, batch_size=4,
                        lr=1e-3, bf16=False)
    steps, summary = run_to_end(sft.training(config))
    assert [s["step"] for s in steps] == [0, 1] and summary["steps"] == 2 and (out / "rlhf_summary.json").is_file()
    assert summary == json.loads((out / "rlhf_summary.json").read_text())
    # the first step's loss (before any update) is the NLL of every response token from the full logits
    tokenizer = load_tokenizer(tiny_model)
    examples = [(encode_prompt(tokenizer, [{"role": "user", "content": d["prompt"]}]),
                 encode_response(tokenizer, d["completion"])) for d in DEMOS]
    ids, attention = pad_right([p + r for p, r in examples], tokenizer.pad_token_id)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(examples):
        mask[i, len(p):len(p) + len(r)] = True
    model = load_causal_lm(tiny_model, torch.device("cpu"))
    with torch.no_grad():
        logprobs = logprobs_from_logits(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
    expected = -logprobs[mask[:, 1:]].mean()
    assert steps[0]["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert steps[0]["batch_tokens"] == sum(len(p) + len(r) for p, r in examples)
    assert steps[0]["tokens"].item() == sum(len(r) for _, r in examples)


def test_main_is_training_run_to_the_end(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl("demos.jsonl", DEMOS)
    summary = sft.main(sft.Config(model=str(tiny_model), data=str(data), output_dir=str(tmp_path / "sft"),
                                  batch_size=2, lr=1e-3, bf16=False))
    rows = [json.loads(line) for line in (tmp_path / "sft_logs" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and [r["step"] for r in rows] == [0, 1]
    assert set(rows[0]) == {"step", "time", "loss", "tokens", "grad_norm", "lr", "bad_steps"}


@pytest.fixture
def scored_pairs(tiny_model):
    """Conversation pairs of the tiny tokenizer: shared prompts, a shared answer start, one a prefix of the other."""
    tokenizer = load_tokenizer(tiny_model)
    pairs = [(encode_conversation(tokenizer, [{"role": "user", "content": p["prompt"]}], p["chosen"]),
              encode_conversation(tokenizer, [{"role": "user", "content": p["prompt"]}], p["rejected"])) for p in PAIRS]
    pairs.append((pairs[0][1], pairs[0][1][:-4]))  # the rejected one is the start of the chosen one
    pairs.append((pairs[1][0][:5] + [7, 8, 9], pairs[2][1]))  # nearly nothing shared
    return tokenizer, pairs


def reward_model(tiny_model, tokenizer, attention="sdpa"):
    torch.manual_seed(0)
    model = load_reward_model(tiny_model, torch.device("cpu"), tokenizer)
    model.config._attn_implementation = attention
    model.score.weight.data.mul_(10)  # scores of order 1, so that differences show
    return model


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pair_scores_equal_one_row_per_conversation(tiny_model, scored_pairs, attention):
    tokenizer, pairs = scored_pairs
    model = reward_model(tiny_model, tokenizer, attention)
    pad_id = model.config.pad_token_id
    assert pad_id != tokenizer.eos_token_id
    ids, mask = pad_right([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    plain = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    (plain[: len(pairs)].sum() - 2 * plain[len(pairs):].sum()).backward()
    plain_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    chosen, rejected = reward.pair_scores(model, pairs, pad_id, torch.device("cpu"))
    (chosen.sum() - 2 * rejected.sum()).backward()
    torch.testing.assert_close(torch.cat([chosen, rejected]), plain.float(), atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_shared_prefix_leaves_a_token_of_each():
    assert reward.shared_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert reward.shared_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 2
    assert reward.shared_prefix_length([1, 2], [1, 2]) == 1
    assert reward.shared_prefix_length([9], [1]) == 0


def test_reward_training_yields_each_step(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl("pairs.jsonl", PAIRS)
    out = tmp_path / "rm"
    config = reward.Config(model=str(tiny_model), data=str(data), output_dir=str(out), eval_fraction=0.0,
                           batch_size=2, lr=1e-3, bf16=False)
    steps, summary = run_to_end(reward.training(config))
    assert [s["step"] for s in steps] == [0, 1] and summary["steps"] == 2 and (out / "rlhf_reward_norm.json").is_file()
    tokenizer = load_tokenizer(tiny_model)
    lengths = {len(encode_conversation(tokenizer, [{"role": "user", "content": p["prompt"]}], p[k]))
               for p in PAIRS for k in ("chosen", "rejected")}
    assert all(s["batch_tokens"] <= 4 * max(lengths) and s["batch_tokens"] >= 4 * min(lengths) for s in steps)


def test_dpo_training_yields_each_step(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl("pairs.jsonl", PAIRS)
    config = dpo.Config(model=str(tiny_model), data=str(data), output_dir=str(tmp_path / "dpo"), eval_fraction=0.0,
                        batch_size=4, epochs=2.0, lr=1e-3, bf16=False)
    steps, summary = run_to_end(dpo.training(config))
    assert len(steps) == 2 and summary["steps"] == 2 and summary["final_loss"] == steps[-1]["loss"]
    tokenizer = load_tokenizer(tiny_model)
    expected = sum(2 * len(encode_prompt(tokenizer, [{"role": "user", "content": p["prompt"]}]))
                   + len(encode_response(tokenizer, p["chosen"])) + len(encode_response(tokenizer, p["rejected"]))
                   for p in PAIRS)
    assert all(s["batch_tokens"] == expected for s in steps)


def test_dpo_pair_log_probs_read_the_prompt_once_with_the_numbers_of_two_rows(tiny_model, monkeypatch):
    """`dpo.pair_logprobs`: a pair's answers behind one copy of the prompt give the summed log-probabilities, token
    counts and gradients of two separate rows."""
    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, torch.device("cpu"))
    batch = [(encode_prompt(tokenizer, [{"role": "user", "content": p["prompt"]}]),
              encode_response(tokenizer, p["chosen"]), encode_response(tokenizer, p["rejected"])) for p in PAIRS]
    batch.append((batch[0][0], batch[0][1][:1], batch[1][2]))  # a one-token answer beside a long one

    def logprobs_and_grads():
        model.zero_grad(set_to_none=True)
        logprobs, counts = dpo.pair_logprobs(model, batch, tokenizer.pad_token_id, torch.device("cpu"), False)
        (logprobs * torch.linspace(1, 2, len(logprobs))).sum().backward()
        return logprobs.detach(), counts, {k: p.grad.clone() for k, p in model.named_parameters()}

    assert dpo.backbone_and_head(model) is not None
    packed = logprobs_and_grads()
    monkeypatch.setattr(dpo, "backbone_and_head", lambda model: None)
    plain = logprobs_and_grads()
    assert packed[1].tolist() == plain[1].tolist() == [len(c) for _, c, _ in batch] + [len(r) for _, _, r in batch]
    torch.testing.assert_close(packed[0], plain[0], atol=1e-4, rtol=1e-5)
    for name, grad in plain[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-4, rtol=1e-4, msg=name)
