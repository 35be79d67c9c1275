"""PPO's reward-hacking monitor: the alarm logic on known histories, and the monitor inside a tiny PPO run."""

import json

import pytest
from safetensors.torch import load_file

from rlhf import monitor as monitor_module
from rlhf import ppo
from rlhf.metrics import hacking_warnings

PROMPTS = [{"prompt": f"Explain {t} to a 10-year-old."} for t in ["rain", "wind", "snow", "the sun"]]


def checks(reward_model, gold, length=(40.0,), distinct2=(0.9,)):
    """A monitor history: one dict per check; a single length or distinct-2 value is repeated."""
    n = len(reward_model)
    length = list(length) * n if len(length) == 1 else list(length)
    distinct2 = list(distinct2) * n if len(distinct2) == 1 else list(distinct2)
    return [{"reward_model": r, "gold": g, "length": tokens, "distinct2": d}
            for r, g, tokens, d in zip(reward_model, gold, length, distinct2)]


def test_reward_up_while_gold_down_is_reward_hacking():
    alarms = hacking_warnings(checks([0.1, 0.4, 0.9], [0.80, 0.78, 0.70]), window=3)
    assert len(alarms) == 1 and "reward hacking" in alarms[0] and "0.800 → 0.700" in alarms[0]


@pytest.mark.parametrize("reward_model,gold", [
    ([0.1, 0.4, 0.9], [0.70, 0.75, 0.80]),   # both rise: what we want
    ([0.1, 0.5, 0.4], [0.80, 0.78, 0.70]),   # the reward model did not keep rising
    ([0.1, 0.4, 0.9], [0.80, 0.80, 0.795]),  # gold flat within the tolerance
])
def test_no_alarm_when_the_scores_do_not_part_ways(reward_model, gold):
    assert hacking_warnings(checks(reward_model, gold), window=3) == []


def test_only_the_last_window_counts():
    history = checks([0.1, 0.4, 0.9, 1.0, 1.1], [0.80, 0.70, 0.72, 0.74, 0.76])  # gold fell early, then recovered
    assert hacking_warnings(history, window=3) == []
    assert hacking_warnings(history[:3], window=3)
    assert hacking_warnings(history[:2], window=3) == []  # too few checks to say


def test_length_and_repetition_drift_from_the_first_check():
    longer = hacking_warnings(checks([0.0, 0.0], [0.5, 0.5], length=[40.0, 64.0]), length_drift=0.5)
    assert len(longer) == 1 and "+60%" in longer[0] and "rambling" in longer[0]
    shorter = hacking_warnings(checks([0.0, 0.0], [0.5, 0.5], length=[40.0, 12.0]), length_drift=0.5)
    assert len(shorter) == 1 and "-70%" in shorter[0] and "shorter" in shorter[0]
    assert hacking_warnings(checks([0.0, 0.0], [0.5, 0.5], length=[40.0, 55.0]), length_drift=0.5) == []
    loops = hacking_warnings(checks([0.0, 0.0], [0.5, 0.5], distinct2=[0.9, 0.6]), distinct_drift=0.15)
    assert len(loops) == 1 and "repeat" in loops[0]
    # more varied answers are no alarm
    assert hacking_warnings(checks([0.0, 0.0], [0.5, 0.5], distinct2=[0.6, 0.9]), distinct_drift=0.15) == []


def test_without_a_judge_only_the_drift_alarms_remain():
    history = [{"reward_model": r, "length": tokens, "distinct2": 0.9}
               for r, tokens in [(0.1, 40.0), (0.5, 40.0), (0.9, 90.0)]]
    alarms = hacking_warnings(history)
    assert len(alarms) == 1 and "length" in alarms[0]


def run_ppo(model, prompts, out, **overrides):
    config = ppo.Config(policy=str(model), reward_model=str(model), data=str(prompts), output_dir=str(out), steps=3,
                        batch_size=4, mini_batch_size=2, max_new_tokens=8, lr=1e-3, bf16=False, gold=False,
                        monitor_prompts=str(prompts), normalize_reward=False, **overrides)
    ppo.main(config)
    return [json.loads(line) for line in (out.parent / f"{out.name}_logs" / "metrics.jsonl").read_text().splitlines()]


def test_monitor_logs_without_changing_training(tiny_model, write_jsonl, tmp_path, monkeypatch, capsys):
    prompts = write_jsonl("prompts.jsonl", PROMPTS)
    monkeypatch.setattr(monitor_module, "hacking_warnings",
                        lambda history, *args: ["test alarm"] if len(history) == 2 else [])
    rows = run_ppo(tiny_model, prompts, tmp_path / "on" / "ppo", monitor_every=2, monitor_size=3)
    # checks at step 0, step 2 (every 2) and step 2 is also the last: two checks
    monitored = [r for r in rows if "monitor/gold" in r]
    assert [r["step"] for r in monitored] == [0, 2]
    for key in ("monitor/gold", "monitor/reward_model", "monitor/length", "monitor/distinct2", "monitor/warning"):
        assert all(isinstance(r[key], float) for r in monitored), key
    assert ([r["monitor/warning"] for r in monitored] == [0.0, 1.0]
            and monitored[1]["monitor/warnings"] == ["test alarm"])
    assert "WARNING (monitor, step 2): test alarm" in capsys.readouterr().out
    shown = [json.loads(line)
             for line in (tmp_path / "on" / "ppo_logs" / "monitor_samples.jsonl").read_text().splitlines()]
    assert ([s["step"] for s in shown] == [0, 0, 0, 2, 2, 2]
            and {"prompt", "response", "gold", "reward_model"} <= set(shown[0]))
    # the same prompts and seed at every check; and the policy trained exactly as with the monitor off
    rows_off = run_ppo(tiny_model, prompts, tmp_path / "off" / "ppo", monitor_every=0)
    assert not any("monitor/gold" in r for r in rows_off)
    assert [r["score"] for r in rows] == [r["score"] for r in rows_off]
    on, off = (load_file(str(tmp_path / "on" / "ppo" / "model.safetensors")),
               load_file(str(tmp_path / "off" / "ppo" / "model.safetensors")))
    assert all((on[k] == off[k]).all() for k in on)
