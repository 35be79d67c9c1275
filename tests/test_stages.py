"""Each stage for two steps on a tiny random model: finite losses, the trained model changed, frozen models
untouched."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf import models as models_module
from rlhf import pairs, ppo, reward, sft

DEMOS = [
    {"prompt": "Explain rain to a 10-year-old.", "completion": "Rain is water that falls from clouds."},
    {"messages": [{"role": "user", "content": "Explain wind to a 10-year-old."},
                  {"role": "assistant", "content": "Wind is air that moves from place to place."}]},
    {"prompt": "Explain snow to a 10-year-old.", "completion": "Snow is frozen rain made of tiny ice crystals."},
    {"prompt": "Explain the sun to a 10-year-old.", "completion": "The sun is a huge ball of hot gas."},
]
PROMPTS = [{"prompt": f"Explain {t} to a 10-year-old."} for t in
           ["rain", "wind", "snow", "the sun", "the moon", "clouds", "rivers", "trees"]]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k in b)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = []
    for i, p in enumerate(PROMPTS):
        rows.append({"prompt": p["prompt"], "chosen": f"A short clear answer number {i}.",
                     "rejected": f"answer answer answer {i} that never ends and"})
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_two_steps_changes_weights(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl("demos.jsonl", DEMOS)
    out = tmp_path / "sft"
    summary = sft.main(sft.Config(model=str(tiny_model), data=str(data), output_dir=str(out), epochs=1.0,
                                  batch_size=2, lr=1e-3, bf16=False))
    assert summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    assert changed(weights(tiny_model), weights(out))
    assert json.loads((out / "rlhf_config.json").read_text())["lr"] == 1e-3
    rows = [json.loads(line) for line in (tmp_path / "sft_logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)


def test_sft_with_lora_saves_a_merged_plain_model(tiny_model, write_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl("demos.jsonl", DEMOS)
    out = tmp_path / "sft_lora"
    sft.main(sft.Config(model=str(tiny_model), data=str(data), output_dir=str(out), epochs=1.0, batch_size=2,
                        lr=1e-2, lora_r=4, bf16=False))
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert changed(weights(tiny_model), weights(out))


def test_pairs_writes_preferences_and_candidates(tiny_model, write_jsonl, tmp_path):
    prompts = write_jsonl("prompts.jsonl", PROMPTS[:4])
    summary = pairs.main(pairs.Config(model=str(tiny_model), data=str(prompts), output_dir=str(tmp_path / "p"),
                                      n_responses=3, max_new_tokens=8, bf16=False))
    rows = [json.loads(line) for line in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    # 4 prompts x C(3,2)=3 pairs, minus any identical answers (counted)
    assert len(rows) + summary["identical_skipped"] == 12
    assert all({"prompt", "chosen", "rejected"} <= set(r) for r in rows)
    pairs.main(pairs.Config(model=str(tiny_model), data=str(prompts), output_dir=str(tmp_path / "c"),
                            max_new_tokens=8, annotator="none", bf16=False))
    cands = [json.loads(line) for line in (tmp_path / "c" / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 4 and all(len(c["responses"]) == 2 for c in cands)


def test_pairs_openings_start_the_answers_they_are_given_to(tiny_model, write_jsonl, tmp_path):
    """`openings`: answer i of every prompt starts with opening i; answers past the list are sampled from the start."""
    prompts = write_jsonl("prompts.jsonl", PROMPTS[:3])
    pairs.main(pairs.Config(model=str(tiny_model), data=str(prompts), output_dir=str(tmp_path / "c"), n_responses=3,
                            openings=["Sorry,", "I don't know"], max_new_tokens=4, annotator="none", bf16=False))
    cands = [json.loads(line) for line in (tmp_path / "c" / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 3
    assert all(c["responses"][0].startswith("Sorry,") and c["responses"][1].startswith("I don't know") for c in cands)
    # a prompt row's own openings win over the config's
    rows = [{"prompt": PROMPTS[0]["prompt"], "openings": ["", "", "No."]}, {"prompt": PROMPTS[1]["prompt"]}]
    own = write_jsonl("own.jsonl", rows)
    pairs.main(pairs.Config(model=str(tiny_model), data=str(own), output_dir=str(tmp_path / "o"), n_responses=3,
                            openings=["Yes"], max_new_tokens=4, annotator="none", bf16=False))
    first, second = [json.loads(line) for line in (tmp_path / "o" / "candidates.jsonl").read_text().splitlines()]
    assert first["responses"][2].startswith("No.") and second["responses"][0].startswith("Yes")
    bad = write_jsonl("bad.jsonl", [{"prompt": PROMPTS[0]["prompt"], "openings": "No."}])
    with pytest.raises(ValueError, match="row 1: openings must be a list"):
        pairs.main(pairs.Config(model=str(tiny_model), data=str(bad), output_dir=str(tmp_path / "b"),
                                annotator="none", bf16=False))
    with pytest.raises(ValueError, match="at most one per response"):
        pairs.main(pairs.Config(model=str(tiny_model), data=str(prompts), output_dir=str(tmp_path / "x"),
                                n_responses=2, openings=["a", "b", "c"]))


def test_reward_trains_on_pairs_longer_than_max_length(tiny_model, write_jsonl, tmp_path):
    """Pairs over max_length keep their answers' ends (the prompt's start goes), so chosen and rejected still differ:
    the loss is not stuck at log 2 and the cut is counted."""
    long_prompt = "Tell a 10-year-old about volcanoes and " + "rocks and mountains and rivers " * 20
    rows = [{"prompt": long_prompt, "chosen": f"Volcanoes are hot mountains {i}.", "rejected": f"zz qq {i} xx."}
            for i in range(6)]
    out = tmp_path / "rm_long"
    summary = reward.main(reward.Config(model=str(tiny_model), data=str(write_jsonl("long.jsonl", rows)),
                                        output_dir=str(out), batch_size=3, eval_fraction=0.0, max_length=48,
                                        lr=1e-3, bf16=False))
    assert summary["truncated"] == 12 and summary["skipped_too_long"] == 0
    rows = [json.loads(line) for line in (tmp_path / "rm_long_logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(abs(loss - math.log(2)) > 1e-6 for loss in losses)


def test_reward_two_steps(tiny_model, pairs_file, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    summary = reward.main(reward.Config(model=str(tiny_model), data=str(pairs_file), output_dir=str(out),
                                        batch_size=3, eval_fraction=0.25, lr=1e-3, bf16=False))
    assert summary["steps"] == 2 and summary["eval_pairs"] == 2
    rows = [json.loads(line) for line in (tmp_path / "rm_logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    norm = json.loads((out / "rlhf_reward_norm.json").read_text())
    assert norm["std"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    base = weights(tiny_model)
    trained = weights(out)
    assert any(not torch.equal(base[k], trained[k]) for k in base if k.startswith("model.") and k in trained) or \
        any(not torch.equal(base["model." + k], trained[k]) for k in trained if "model." + k in base)


@pytest.fixture(scope="module")
def reward_dir(tiny_model, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "reward"
    reward.main(reward.Config(model=str(tiny_model), data=str(pairs_file), output_dir=str(out), batch_size=4,
                              lr=1e-3, bf16=False))
    return out


def _spy_loaders(monkeypatch):
    """Record every model ppo.main loads, to check the frozen ones after training."""
    loaded = {"causal": [], "reward": []}
    real_causal, real_reward = models_module.load_causal_lm, models_module.load_reward_model

    def causal(*args, **kwargs):
        model = real_causal(*args, **kwargs)
        loaded["causal"].append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    def reward_model(*args, **kwargs):
        model = real_reward(*args, **kwargs)
        loaded["reward"].append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(ppo, "load_causal_lm", causal)
    monkeypatch.setattr(ppo, "load_reward_model", reward_model)
    return loaded


@pytest.mark.parametrize("lora_r,kl_estimator,target_kl", [(0, "k1", 0.0), (4, "k3", 1.0)])
def test_ppo_two_steps(tiny_model, reward_dir, write_jsonl, tmp_path, monkeypatch, lora_r, kl_estimator, target_kl):
    prompts = write_jsonl("prompts.jsonl", PROMPTS)
    loaded = _spy_loaders(monkeypatch)
    out = tmp_path / "ppo"
    summary = ppo.main(ppo.Config(policy=str(tiny_model), reward_model=str(reward_dir), data=str(prompts),
                                  output_dir=str(out), steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=8,
                                  lr=1e-3, lora_r=lora_r, kl_estimator=kl_estimator, target_kl=target_kl,
                                  bf16=False, gold=False))
    rows = [json.loads(line) for line in (tmp_path / "ppo_logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for key in ("score", "kl", "beta", "entropy", "clipfrac", "value_loss", "policy_loss", "response_length"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), key
    if target_kl:
        assert summary["final_beta"] != 0.05  # the adaptive controller moved β
    # the trained policy changed; the reference and the reward model did not
    assert changed(weights(tiny_model), weights(out))
    assert (out / "value_head.safetensors").is_file()
    policy, *frozen = loaded["causal"]
    assert len(frozen) == (0 if lora_r else 1)
    for model, before in frozen + loaded["reward"]:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    if lora_r:  # the reference is the base weights with the adapter off: they must be untouched
        model, before = policy
        base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
        untouched = [k for k in before if k in base]
        assert untouched and all(torch.equal(before[k], base[k]) for k in untouched)


RULES = '''
def varied(prompts, completions, topic, **fields):
    """A reward that differs between answers to one prompt; it checks that each answer came with its own row."""
    for prompt, subject in zip(prompts, topic):
        if subject not in prompt:
            raise AssertionError(f"row field {subject!r} sent with prompt {prompt!r}")
    return [float(len(c) % 3) for c in completions]
'''


@pytest.mark.parametrize("settings", [
    {"advantage": "grpo", "group_size": 2, "kl_in": "loss", "loss_aggregation": "sequence"},
    {"advantage": "dr_grpo", "group_size": 2, "kl_in": "loss", "loss_aggregation": "constant", "clip_high": 0.28,
     "dynamic_sampling": True},
    {"advantage": "rloo", "group_size": 4, "kl_in": "reward", "overlong_buffer": 4},
    {"advantage": "reinforce_pp", "group_size": 1, "kl_in": "reward"},
    {"advantage": "gae", "group_size": 2, "kl_in": "loss", "with_reward_model": True},
])
def test_online_rl_two_steps_of_each_advantage(tiny_model, reward_dir, write_jsonl, tmp_path, monkeypatch, settings):
    """Each advantage choice on PPO's loop, rewarded by a function from a file (called with the rows' fields); the
    critic-free ones build no value function."""
    settings = dict(settings)
    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    topics = ["rain", "wind", "snow", "the sun", "the moon", "clouds", "rivers", "trees"]
    prompts = write_jsonl("prompts.jsonl", [{"prompt": f"Explain {t} to a 10-year-old.", "topic": t} for t in topics])
    loaded = _spy_loaders(monkeypatch)
    out = tmp_path / "policy"
    reward_model = str(reward_dir) if settings.pop("with_reward_model", False) else ""
    summary = ppo.main(ppo.Config(policy=str(tiny_model), reward_model=reward_model, reward_fn=[f"{rules}:varied"],
                                  data=str(prompts), output_dir=str(out), steps=2, batch_size=4, mini_batch_size=2,
                                  max_new_tokens=8, lr=1e-3, beta=0.05, bf16=False, gold=False, monitor_every=0,
                                  **settings))
    rows = [json.loads(line) for line in (tmp_path / "policy_logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and summary["advantage"] == settings["advantage"]
    for key in ("score", "kl", "policy_loss", "grad_norm", f"reward_fn/{rules}:varied"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert all(("kl_loss" in r) == (settings["kl_in"] == "loss") for r in rows)
    assert all(("value_loss" in r) == (settings["advantage"] == "gae") for r in rows)
    assert ("reward_model_score" in rows[0]) == bool(reward_model)
    if settings.get("dynamic_sampling"):
        assert all(1 <= r["sampling_rounds"] <= 4 for r in rows)
    # the policy changed; the reference (and the reward model) did not; no value head for the critic-free choices
    assert changed(weights(tiny_model), weights(out))
    assert (out / "value_head.safetensors").is_file() == (settings["advantage"] == "gae")
    policy, *frozen = loaded["causal"]
    assert len(frozen) == 1 and len(loaded["reward"]) == bool(reward_model)
    for model, before in frozen + loaded["reward"]:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("settings, message", [
    ({"advantage": "grpo", "group_size": 1}, "group_size must be at least 2, got 1"),
    ({"advantage": "rloo", "group_size": 3, "batch_size": 4, "mini_batch_size": 4}, "must be a multiple of group_size"),
    ({"advantage": "a2c"}, "advantage must be one of gae, reinforce_pp, grpo"),
    ({"kl_in": "both"}, "kl_in must be 'reward' or 'loss'"),
    ({"loss_aggregation": "sum"}, "loss_aggregation must be one of token, sequence, constant"),
    ({"reward_model": "none"}, "no reward: give a reward_model folder, reward_fn"),
    ({"reward_fn": ["a.py:f"], "reward_weights": [1.0, 2.0]}, "1 reward functions but 2 reward_weights"),
    ({"overlong_buffer": 65}, "overlong_buffer must be between 0"),
])
def test_online_rl_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ppo.check(ppo.Config(**settings))


def test_rlhf_grpo_is_ppos_stage_with_grpos_defaults(tmp_path):
    from rlhf import cli, grpo

    path = tmp_path / "grpo.yaml"
    path.write_text("reward_model: ''\nreward_fn: [rlhf.verifiable:reward]\ngroup_size: 8\n")
    config = cli.parse_stage_args("grpo", grpo.Config, ["--config", str(path), "--beta", "0.1"])
    assert (config.advantage, config.group_size, config.kl_in, config.beta) == ("grpo", 8, "loss", 0.1)
    assert config.reward_fn == ["rlhf.verifiable:reward"] and config.loss_aggregation == "token"
    assert grpo.Config().kl_in == "loss" and ppo.Config().kl_in == "reward" and ppo.Config().advantage == "gae"
    assert cli.main(["grpo", "--advantage", "grpo", "--group_size", "1"]) == 2


def test_grpo_speaks_as_grpo(tiny_model, write_jsonl, capsys):
    """`rlhf grpo` runs PPO's loop; what it prints names it as the stage the user ran."""
    from rlhf import grpo
    from rlhf.models import load_tokenizer

    prompts = write_jsonl("prompts.jsonl", [{"prompt": f"Explain {t}."} for t in ("rain", "wind", "snow", "the sun")])
    tokenizer = load_tokenizer(tiny_model)
    for stage in (ppo, grpo):
        ppo.training_prompts(stage.Config(data=str(prompts), batch_size=4, mini_batch_size=2, group_size=2), tokenizer)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed] == [["[ppo]", "4"], ["[grpo]", "4"]]


def test_ppo_separate_critic_model(tiny_model, reward_dir, write_jsonl, tmp_path, monkeypatch):
    """critic: model is the four-model set-up: a trainable copy of the reward model gives the values."""
    prompts = write_jsonl("prompts.jsonl", PROMPTS)
    loaded = _spy_loaders(monkeypatch)
    out = tmp_path / "ppo"
    ppo.main(ppo.Config(policy=str(tiny_model), reward_model=str(reward_dir), data=str(prompts), output_dir=str(out),
                        steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=8, lr=1e-3, value_lr=1e-3,
                        critic="model", bf16=False, gold=False))
    rows = [json.loads(line) for line in (tmp_path / "ppo_logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["value_loss"] > 0 for r in rows)
    (reward, reward_before), (critic, critic_before) = loaded["reward"]
    assert all(torch.equal(reward_before[k], v) for k, v in reward.state_dict().items())  # the reward model is frozen
    assert any(not torch.equal(critic_before[k], v) for k, v in critic.state_dict().items())  # the critic trained
    assert not (out / "value_head.safetensors").exists()
    assert changed(weights(tiny_model), weights(out))
    # the trained critic is saved inside the policy's folder, as a sequence classifier that loads on its own
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(out / "critic").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in critic.state_dict().items())


def test_ppo_critic_values_read_every_position(tiny_model, reward_dir):
    """A separate critic's value at the last response position is its sequence score there (same head, same
    hidden state), so the per-token values are the classifier's score read at every position."""
    from rlhf.models import load_reward_model, load_tokenizer
    from rlhf.rollout import Rollout

    tokenizer = load_tokenizer(reward_dir)
    critic = load_reward_model(reward_dir, torch.device("cpu"), tokenizer, trainable=False)
    pad = critic.config.pad_token_id
    prompt = torch.tensor([[pad, 5, 6, 7], [8, 9, 10, 11]])
    prompt_mask = (prompt != pad).long()
    response = torch.tensor([[12, 13, 14], [15, 16, 17]])
    rollout = Rollout(prompt, prompt_mask, response, torch.ones_like(response, dtype=torch.bool),
                      torch.ones(2, dtype=torch.bool), ["", ""])
    values = ppo.critic_values(critic, rollout, bf16=False, device=torch.device("cpu"))
    assert values.shape == (2, 3)
    # the value before the last response token is the classifier's score of the sequence cut just before it
    cut = Rollout(prompt, prompt_mask, response[:, :2], torch.ones(2, 2, dtype=torch.bool),
                  torch.ones(2, dtype=torch.bool), ["", ""])
    from rlhf.data import position_ids_from_mask

    with torch.no_grad():
        score = critic(input_ids=cut.input_ids, attention_mask=cut.attention_mask,
                       position_ids=position_ids_from_mask(cut.attention_mask), use_cache=False).logits[:, 0]
    assert torch.allclose(values[:, -1], score, atol=1e-5)


def test_ppo_single_update_reuses_the_rollout_forward(tiny_model, reward_dir, write_jsonl, tmp_path):
    """One epoch over one mini-batch: reusing the rollout's forward pass gives the update a second pass would."""
    prompts = write_jsonl("prompts.jsonl", PROMPTS)
    outs = {}
    for reuse in (True, False):
        out = tmp_path / f"ppo_{reuse}"
        ppo.main(ppo.Config(policy=str(tiny_model), reward_model=str(reward_dir), data=str(prompts),
                            output_dir=str(out), steps=2, batch_size=4, mini_batch_size=4, ppo_epochs=1,
                            max_new_tokens=8, lr=1e-4, reuse_rollout_forward=reuse, bf16=False, gold=False,
                            monitor_every=0))
        outs[reuse] = weights(out)
    assert changed(weights(tiny_model), outs[True])
    # lr 1e-4, not 1e-3: Adam divides by the gradient's own scale, so an entry whose gradient is rounding noise
    # moves by a small fraction of lr either way (1 of 32,768 embedding entries was 4.6e-6 off at lr 1e-3); at 1e-4
    # that stays under the tolerance, while a forward pass that did not match would move entries by ~lr
    for name, tensor in outs[True].items():
        assert torch.allclose(tensor, outs[False][name], atol=1e-6), name


def test_ppo_separate_critic_side_by_side_gives_the_same_update(tiny_model, reward_dir, write_jsonl, tmp_path,
                                                                monkeypatch):
    """With a separate critic the policy's and the critic's backward passes run at once on CPU (`side_by_side`):
    the trained policy and critic equal those of the run that takes them in turn."""
    import threading

    import rlhf.fast.lanes as lanes_module

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two threads to share, whatever the machine
    lane_threads = []
    real = lanes_module._run_with_threads
    monkeypatch.setattr(lanes_module, "_run_with_threads",
                        lambda *args: lane_threads.append(threading.current_thread().name) or real(*args))
    prompts = write_jsonl("prompts.jsonl", PROMPTS)
    outs, logs = {}, {}
    try:
        for side_by_side in (True, False):
            out = tmp_path / f"ppo_{side_by_side}"
            ppo.main(ppo.Config(policy=str(tiny_model), reward_model=str(reward_dir), data=str(prompts),
                                output_dir=str(out), steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=8,
                                lr=1e-4, value_lr=1e-4, critic="model", side_by_side=side_by_side, bf16=False,
                                gold=False, monitor_every=0))
            outs[side_by_side] = (weights(out), weights(out / "critic"))
            logs[side_by_side] = [json.loads(line) for line in
                                  (tmp_path / f"ppo_{side_by_side}_logs" / "metrics.jsonl").read_text().splitlines()]
            if side_by_side:
                # 2 steps x 2 epochs x 2
                assert len(lane_threads) == 8 and all(n.startswith("rlhf-lane") for n in lane_threads)
    finally:
        torch.set_num_threads(before)
    assert len(lane_threads) == 8  # the run in turn used no lane
    assert changed(weights(tiny_model), outs[True][0])
    # the gradient's norm (policy and critic together, before clipping) is logged at every update: Adam alone would
    # hide a critic gradient off by a constant factor
    for together, in_turn in zip(logs[True], logs[False]):
        for key in ("grad_norm", "policy_loss", "value_loss", "kl", "score"):
            assert together[key] == pytest.approx(in_turn[key], rel=1e-5, abs=1e-7), key
    for together, in_turn in zip(outs[True], outs[False]):
        for name, tensor in together.items():
            assert torch.allclose(tensor, in_turn[name], atol=1e-6), name


def test_weights_cast_once_restores_frozen_flags(tiny_model):
    """Sampling a frozen model lets autocast keep its bf16 weight casts for the call, then leaves it frozen."""
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rollout import sample

    model = load_causal_lm(tiny_model, torch.device("cpu"), trainable=False)
    rollout = sample(model, load_tokenizer(tiny_model), [[{"role": "user", "content": "hi"}]], 4, bf16=True)
    assert rollout.response_ids.shape[0] == 1
    assert not any(p.requires_grad for p in model.parameters())
