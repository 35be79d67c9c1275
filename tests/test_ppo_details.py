"""PPO details that turn into NaN or silent mistakes: padding times Inf, k3's overflow, a critic in other units or
with another tokenizer, a full critic at the value head's lr, a reward model without its normalisation, several end
tokens."""

import json
import shutil

import pytest
import torch

from rlhf import losses, ppo, reward
from rlhf.models import load_reward_normalisation, load_tokenizer
from rlhf.ops import zero_outside
from rlhf.rollout import sample, stop_ids, truncate_at_eos

PROMPTS = [{"prompt": f"Explain {t} to a 10-year-old."} for t in ["rain", "wind", "snow", "the sun"]]


def test_masking_the_kl_with_where_keeps_an_inf_past_eos_out():
    kl = torch.tensor([[0.5, float("inf")], [0.25, 0.75]])
    mask = torch.tensor([[True, False], [True, True]])
    assert torch.isnan((kl * mask).sum())  # what `kl * mask` did
    masked = zero_outside(kl, mask)
    assert masked.tolist() == [[0.5, 0.0], [0.25, 0.75]]
    rewards, _ = losses.kl_shaped_rewards(torch.tensor([1.0, 2.0]), masked, mask, beta=0.1)
    assert torch.isfinite(rewards).all()


def test_k3_clamps_the_log_ratio():
    logprobs = torch.tensor([[-100.0, -1.0]])
    ref_logprobs = torch.tensor([[-0.0, -1.0]])  # log ρ = 100: expm1 overflows without the clamp
    kl = losses.kl_k3(logprobs, ref_logprobs)
    assert torch.isfinite(kl).all()
    clamp = losses.MAX_LOG_RATIO
    assert kl[0, 0].item() == pytest.approx(torch.expm1(torch.tensor(clamp)).item() - clamp, rel=1e-6)
    assert kl[0, 1].item() == 0.0


@pytest.fixture(scope="module")
def reward_dir(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm")
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p["prompt"], "chosen": f"A clear answer {i}.",
                                        "rejected": f"no no no {i}"}) + "\n" for i, p in enumerate(PROMPTS * 2)))
    reward.main(reward.Config(model=str(tiny_model), data=str(path), output_dir=str(folder / "reward"), batch_size=4,
                              lr=1e-3, bf16=False, save_every=0))
    return folder / "reward"


def test_a_reward_model_without_its_normalisation_is_an_error(tiny_model, reward_dir, tmp_path):
    mean, std = load_reward_normalisation(reward_dir)
    assert std > 0
    with pytest.raises(ValueError, match="has no rlhf_reward_norm.json .* normalize_reward false"):
        load_reward_normalisation(tiny_model)
    broken = tmp_path / "rm"
    shutil.copytree(reward_dir, broken)
    (broken / "rlhf_reward_norm.json").write_text('{"mean": 0.0, "std": 0.0}')
    with pytest.raises(ValueError, match="std > 0"):
        load_reward_normalisation(broken)


def critic_config(tiny_model, reward_dir, tmp_path, **overrides):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return ppo.Config(policy=str(tiny_model), reward_model=str(reward_dir), data=str(prompts),
                      output_dir=str(tmp_path / "ppo"), steps=1, batch_size=4, mini_batch_size=2, max_new_tokens=4,
                      critic="model", bf16=False, gold=False, monitor_every=0, **overrides)


def test_a_separate_critic_gives_values_in_the_normalised_units(tiny_model, reward_dir, tmp_path):
    config = critic_config(tiny_model, reward_dir, tmp_path)
    models = ppo.load_models(config, torch.device("cpu"), bf16=False)
    models.reward_mean, models.reward_std = 2.0, 4.0
    rollout = sample(models.policy, models.tokenizer, [[{"role": "user", "content": "Hi"}]] * 2, 4, bf16=False)
    with torch.no_grad():
        _, values, _ = models.policy_forward(rollout, config, False, torch.device("cpu"))
        raw = ppo.critic_values(models.critic, rollout, False, torch.device("cpu"))
    assert torch.allclose(values, (raw - 2.0) / 4.0)


def test_a_separate_critic_gets_its_own_learning_rate(tiny_model, reward_dir, tmp_path):
    config = critic_config(tiny_model, reward_dir, tmp_path, lr=3e-5, critic_lr=2e-6, value_lr=1e-3)
    optimizer = ppo.load_models(config, torch.device("cpu"), bf16=False).optimiser(config)[0]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [3e-5, 2e-6]
    head = ppo.Config(**{**config.__dict__, "critic": "head"})
    optimizer = ppo.load_models(head, torch.device("cpu"), bf16=False).optimiser(head)[0]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [3e-5, 1e-3]
    assert ppo.Config().critic_lr < ppo.Config().value_lr


def test_a_critic_with_another_tokenizer_is_refused(tiny_model, reward_dir, tmp_path):
    other = tmp_path / "other-rm"
    shutil.copytree(reward_dir, other)
    tokenizer = load_tokenizer(other)
    tokenizer.add_tokens(["<|a-new-token|>"])
    tokenizer.save_pretrained(other)
    config = critic_config(tiny_model, other, tmp_path)
    with pytest.raises(ValueError, match="another tokenizer than the policy"):
        ppo.load_models(config, torch.device("cpu"), bf16=False)


def test_every_end_token_of_the_generation_config_stops_a_response(tiny_model):
    from rlhf.models import load_causal_lm

    model = load_causal_lm(tiny_model, torch.device("cpu"), trainable=False)
    tokenizer = load_tokenizer(tiny_model)
    assert stop_ids(model, tokenizer) == [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert stop_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, 7})
    ids, mask, ended = truncate_at_eos(torch.tensor([[5, 7, 9, 9], [5, 6, 8, 9]]), [tokenizer.eos_token_id, 7], 0)
    assert ids.tolist() == [[5, 7, 0, 0], [5, 6, 8, 9]] and ended.tolist() == [True, False]
    # every id an end token: each answer stops after its first token, and counts as ended
    model.generation_config.eos_token_id = list(range(len(tokenizer)))
    rollout = sample(model, tokenizer, [[{"role": "user", "content": "Hi"}]] * 3, 6, bf16=False)
    assert rollout.ended.all() and rollout.lengths.tolist() == [1, 1, 1]


@pytest.mark.parametrize("group_size, mini_batch_size, whole_groups", [(4, 8, True), (4, 6, False), (1, 8, False)])
def test_mini_batches_keep_a_prompts_answers_together_when_they_can(group_size, mini_batch_size, whole_groups):
    config = ppo.Config(batch_size=24, mini_batch_size=mini_batch_size, group_size=group_size)  # 6: not whole groups
    torch.manual_seed(0)
    orders = [ppo.mini_batch_order(config, torch.device("cpu")) for _ in range(5)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(24))
        if whole_groups:  # each run of group_size rows is one group, in order
            runs = order.view(-1, group_size)
            assert (runs[:, 0] % group_size == 0).all() and (runs.diff(dim=1) == 1).all()
    assert len({tuple(o.tolist()) for o in orders}) == 5  # random
    if not whole_groups and group_size > 1:  # row by row: some group is split
        assert any(((o.view(-1, group_size).diff(dim=1) != 1).any()) for o in orders)


def test_max_prompts_keeps_the_first_prompts_of_the_file(tiny_model, write_jsonl):
    # `make hhh` trains PPO on the head of an interleaved file, where every kind of prompt is equally common
    rows = [{"prompt": f"question number {i}", "answer": str(i)} for i in range(10)]
    data = write_jsonl("prompts.jsonl", rows)
    tokenizer = load_tokenizer(tiny_model)
    config = ppo.Config(policy=str(tiny_model), reward_model="none", reward_fn=["rlhf.rewards:gold"], data=str(data),
                        batch_size=4, mini_batch_size=2, max_prompts=6)
    prompts, fields = ppo.training_prompts(config, tokenizer)
    assert [p[-1]["content"] for p in prompts] == [f"question number {i}" for i in range(6)]
    assert [f["answer"] for f in fields] == [str(i) for i in range(6)]
    config.max_prompts = 0
    assert len(ppo.training_prompts(config, tokenizer)[0]) == 10
    config.max_prompts = -1
    with pytest.raises(ValueError, match="max_prompts must be ≥ 0"):
        ppo.check(config)
