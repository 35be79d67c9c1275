"""The whole tiny pipeline end to end; its checkpoints reload with plain transformers; a rerun skips finished stages."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf import config as cfg
from rlhf import pipeline, wiring
from rlhf.data import resolve_data_path


def tiny_config(run, model):
    return cfg.build(pipeline.Config, {
        "output_dir": str(run), "model": str(model), "bf16": False, "method": "both",
        "sft": {"epochs": 0.1, "batch_size": 8, "lr": 1e-3},
        "pairs": {"max_prompts": 16, "max_new_tokens": 8},
        "reward": {"batch_size": 8, "lr": 1e-3},
        "ppo": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 8, "lr": 1e-4},
        "dpo": {"batch_size": 4, "lr": 1e-3},
        "eval": {"max_prompts": 8, "max_new_tokens": 8},
    })


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run = tmp_path / "run"
    results = pipeline.main(tiny_config(run, tiny_model))
    assert set(results) == {"sft", "pairs", "reward", "ppo", "dpo", "eval"}
    AutoModelForCausalLM.from_pretrained(run / "sft")
    AutoModelForCausalLM.from_pretrained(run / "ppo")
    AutoModelForCausalLM.from_pretrained(run / "dpo")
    AutoModelForSequenceClassification.from_pretrained(run / "reward")
    for stage in ("sft", "reward", "ppo"):
        assert (run / f"{stage}_logs" / "metrics.jsonl").is_file()
        assert list((run / f"{stage}_logs" / "tensorboard").iterdir())
    ppo_rows = [json.loads(line) for line in (run / "ppo_logs" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward_model_score", "kl", "beta", "entropy", "clipfrac", "value_loss", "response_length",
                "gold_score"):
        assert key in ppo_rows[0]
    assert (run / "ppo_logs" / "samples.jsonl").is_file() and (run / "config.yaml").is_file()
    table = capsys.readouterr().out
    assert "SFT" in table and "PPO" in table and "DPO" in table and "gold win rate" in table
    assert "Wall time of each road" in table
    eval_rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    assert len(eval_rows) == 3 and all("win_rate" in row for row in eval_rows[1:])

    # a second run recomputes nothing
    stamp = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    pipeline.main(tiny_config(run, tiny_model))
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 6
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == stamp

    # a deleted checkpoint is not "finished": that stage and the later ones run again, saying why
    shutil.rmtree(run / "reward")
    pipeline.main(tiny_config(run, tiny_model))
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 2  # sft and pairs
    assert f"reward: its output {run / 'reward'} is missing; rerunning it and the stages after it" in out
    AutoModelForSequenceClassification.from_pretrained(run / "reward")


@dataclass
class Step:
    data: str
    output_dir: str
    lr: float = 1.0


def test_a_builtin_data_set_is_fingerprinted_by_what_it_holds(tmp_path, monkeypatch):
    """`builtin:NAME` is no path, but a stage that reads it must rerun when the package's built-in data changes."""
    from rlhf import hhh

    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    step = Step("builtin:hhh_prompts_train", str(tmp_path / "out"))
    before = wiring.input_fingerprints(step, resolve_data_path)
    assert set(before) == {"data"} and before["data"].startswith("sha256 ")
    monkeypatch.setattr(hhh, "rows_of", lambda name: [{"prompt": "a prompt the package did not hold before"}])
    assert wiring.input_fingerprints(step, resolve_data_path)["data"] != before["data"]
    assert wiring.input_fingerprints(Step("builtin:no_such_set", str(tmp_path / "out")), resolve_data_path) == {}


def test_an_edited_input_or_a_missing_output_reruns_the_right_stages(tmp_path, capsys):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    ran = []

    def stage(name):
        def run(config):
            ran.append(name)
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(config.output_dir) / "out.txt").write_text(f"{name} {len(ran)}")
            return {"n": len(ran)}
        return run

    def road(first_lr=1.0):
        return {"first": (stage("first"), Step(str(data), str(tmp_path / "first"), first_lr)),
                "second": (stage("second"), Step(str(tmp_path / "first"), str(tmp_path / "second"))),
                "third": (stage("third"), Step(str(tmp_path / "extra.txt"), str(tmp_path / "third")))}

    (tmp_path / "extra.txt").write_text("x")
    wiring.run_road(road(), tmp_path / "stages", resolve=resolve_data_path)
    assert ran == ["first", "second", "third"]
    wiring.run_road(road(), tmp_path / "stages", resolve=resolve_data_path)
    assert ran == ["first", "second", "third"]  # nothing changed: nothing ran

    (tmp_path / "extra.txt").write_text("y")  # the third stage's own input
    wiring.run_road(road(), tmp_path / "stages", resolve=resolve_data_path)
    assert ran[3:] == ["third"] and "third: its input changed (data)" in capsys.readouterr().out

    data.write_text('{"prompt": "a", "completion": "c"}\n')  # the first stage's input: all three run
    wiring.run_road(road(), tmp_path / "stages", resolve=resolve_data_path)
    assert ran[4:] == ["first", "second", "third"]
    assert "first: its input changed (data); rerunning it and the stages after it" in capsys.readouterr().out

    shutil.rmtree(tmp_path / "second")
    wiring.run_road(road(), tmp_path / "stages", resolve=resolve_data_path)
    assert ran[7:] == ["second", "third"]
    assert f"second: its output {tmp_path / 'second'} is missing" in capsys.readouterr().out

    wiring.run_road(road(first_lr=2.0), tmp_path / "stages", resolve=resolve_data_path)
    assert ran[9:] == ["first", "second", "third"]
    assert "first: config changed since the last run (lr)" in capsys.readouterr().out


def test_pipeline_rejects_overriding_its_wiring(tiny_model, tmp_path):
    config = tiny_config(tmp_path / "run", tiny_model)
    config.ppo["policy"] = "elsewhere"
    with pytest.raises(cfg.ConfigError, match="'ppo.policy' is set by the pipeline"):
        pipeline.stage_configs(config)
    config.ppo.pop("policy")
    config.ppo["stepz"] = 3
    with pytest.raises(cfg.ConfigError, match="Did you mean 'steps'"):
        pipeline.stage_configs(config)


def test_method_picks_the_stages(tiny_model, tmp_path):
    config = tiny_config(tmp_path / "run", tiny_model)
    config.method = "dpo"
    assert list(pipeline.stage_configs(config)) == ["sft", "pairs", "dpo", "eval"]
    config.method = "ppo"
    assert list(pipeline.stage_configs(config)) == ["sft", "pairs", "reward", "ppo", "eval"]
    config.method = "rlaif"
    with pytest.raises(cfg.ConfigError, match="method must be one of"):
        pipeline.stage_configs(config)
