"""The whole tiny pipeline end to end; its checkpoints reload with plain transformers; a rerun skips finished stages."""

import json

import pytest

from rlhf import config as cfg
from rlhf import pipeline


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
