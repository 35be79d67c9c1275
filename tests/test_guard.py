"""Runs that go wrong stop loudly: a non-finite step is skipped and counted, a run of them stops with the last good
state kept, a NaN model is never saved, sampling from a broken distribution raises; bad settings and files are
one-line errors naming the key or the file."""

import gc
import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf import cli, dpo, ppo, reward, sft
from rlhf import config as cfg
from rlhf.guard import BadStepError, BadSteps

DEMOS = [{"prompt": f"Explain {t} to a 10-year-old.", "completion": f"{t.capitalize()} is part of nature."}
         for t in ["rain", "wind", "snow", "the sun", "the moon", "clouds", "rivers", "trees"]]


def test_bad_steps_skips_counts_and_stops_after_the_limit(capsys):
    guard = BadSteps("sft", max_bad_steps=2)
    assert guard.ok(0, loss=torch.tensor(1.0), grad_norm=torch.tensor(2.0))
    assert not guard.ok(1, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(2.0))
    assert "step 1: loss=nan is not finite; update skipped (1 in a row, 1 in all" in capsys.readouterr().out
    assert guard.ok(2, loss=1.0, grad_norm=3.0) and guard.in_a_row == 0 and guard.total == 1
    assert not guard.ok(3, loss=1.0, grad_norm=float("inf"))
    with pytest.raises(BadStepError, match="2 steps in a row up to step 4 had a non-finite grad_norm"):
        guard.ok(4, loss=1.0, grad_norm=float("inf"))
    with pytest.raises(BadStepError, match="the last 2 steps of 5 steps"):
        guard.check_last(5)


def nan_loss_at(monkeypatch, module, name, bad_steps: set[int]):
    """Make `module.name` (a loss function) return NaN on the given calls (0-based), the rest untouched."""
    real, calls = getattr(module, name), []

    def loss(*args, **kwargs):
        value, stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) - 1 in bad_steps:
            value = value * float("nan")
            stats = {**stats, "nll": value.detach()} if "nll" in stats else stats
        return value, stats

    monkeypatch.setattr(module, name, loss)


def all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


def test_sft_skips_a_nan_step_and_counts_it(tiny_model, write_jsonl, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, sft, "sft_loss", {1})
    out = tmp_path / "sft"
    summary = sft.main(sft.Config(model=str(tiny_model), data=str(write_jsonl("d.jsonl", DEMOS)), output_dir=str(out),
                                  batch_size=2, lr=1e-3, bf16=False))
    assert summary["steps"] == 4 and summary["bad_steps"] == 1
    assert all_finite(out)
    rows = [json.loads(line) for line in (tmp_path / "sft_logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in rows] == [0, 1, 1, 1]


def test_a_run_of_nan_steps_stops_and_keeps_the_last_good_state(tiny_model, write_jsonl, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, sft, "sft_loss", set(range(2, 100)))
    out = tmp_path / "sft"
    config = sft.Config(model=str(tiny_model), data=str(write_jsonl("d.jsonl", DEMOS)), output_dir=str(out),
                        batch_size=2, epochs=2.0, lr=1e-3, bf16=False, save_every=1)
    with pytest.raises(BadStepError, match="3 steps in a row up to step 4"):
        sft.main(config)
    assert not out.exists()  # no checkpoint of a diverged run
    states = sorted(p.name for p in (tmp_path / "sft_state").iterdir())
    assert states == ["step-000002"]  # the state after the last good step, the one a rerun continues from
    saved = load_file(str(tmp_path / "sft_state" / "step-000002" / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_reward_and_dpo_stop_on_nan_losses(stage, tiny_model, write_jsonl, tmp_path, monkeypatch):
    pairs = write_jsonl("p.jsonl", [{"prompt": d["prompt"], "chosen": d["completion"], "rejected": "no idea, sorry"}
                                    for d in DEMOS])
    module, name = (reward, "bradley_terry_loss") if stage == "reward" else (dpo.losses, "dpo_loss")
    nan_loss_at(monkeypatch, module, name, set(range(100)))
    config = (reward.Config if stage == "reward" else dpo.Config)(
        model=str(tiny_model), data=str(pairs), output_dir=str(tmp_path / stage), batch_size=2, bf16=False,
        max_bad_steps=2)
    with pytest.raises(BadStepError, match="2 steps in a row up to step 1"):
        (reward if stage == "reward" else dpo).main(config)
    assert not (tmp_path / stage).exists()


def test_ppo_stops_on_nan_losses(tiny_model, write_jsonl, tmp_path, monkeypatch):
    from rlhf.models import load_reward_model, load_tokenizer, save_atomic

    rm = tmp_path / "rm"
    save_atomic(rm, model=load_reward_model(tiny_model, torch.device("cpu"), load_tokenizer(tiny_model)),
                tokenizer=load_tokenizer(tiny_model), json_files={"rlhf_reward_norm.json": {"mean": 0, "std": 1}})
    nan_loss_at(monkeypatch, ppo.losses, "clipped_policy_loss", set(range(100)))
    config = ppo.Config(policy=str(tiny_model), reward_model=str(rm), output_dir=str(tmp_path / "ppo"),
                        data=str(write_jsonl("p.jsonl", [{"prompt": d["prompt"]} for d in DEMOS])), steps=2,
                        batch_size=4, mini_batch_size=2, max_new_tokens=4, gold=False, monitor_every=0, bf16=False)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(BadStepError, match="3 updates in a row up to step 0 had a non-finite policy_loss"):
        ppo.main(config)
    assert not (tmp_path / "ppo").exists()
    gc.collect()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # the stage let go of them


def test_save_refuses_a_model_with_a_nan_weight(tmp_path):
    from rlhf.models import save_atomic

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")

    class Saveable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def save_pretrained(self, folder, **kwargs):
            raise AssertionError("never reached")

    with pytest.raises(ValueError, match=r"refusing to save .*ckpt: 1 tensor\(s\) hold NaN or Inf \(model inner"):
        save_atomic(tmp_path / "ckpt", model=Saveable())
    with pytest.raises(ValueError, match="value_head.safetensors weight"):
        save_atomic(tmp_path / "ckpt", tensors={"value_head.safetensors": model.state_dict()})
    assert list(tmp_path.iterdir()) == []


def test_sampling_from_a_broken_distribution_raises():
    from rlhf.rollout import draw_tokens

    good = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    assert draw_tokens(good).shape == (2,)
    for broken in ([[0.5, 0.5], [float("nan"), 0.1]], [[0.5, 0.5], [0.0, 0.0]], [[float("inf"), 0.1], [1.0, 0.0]]):
        with pytest.raises(ValueError, match="next-token distribution of row"):
            draw_tokens(torch.tensor(broken))


# --- settings: each bad one is a one-line error naming the key ------------------------------------------------
BAD_SETTINGS = [
    (["dpo", "--beta", "-1"], "'beta' must be greater than 0, got -1.0"),
    (["dpo", "--loss", "ipo", "--beta", "0"], "'beta' must be greater than 0, got 0.0"),
    (["ppo", "--beta", "-1"], "'beta' must be at least 0, got -1.0"),
    (["sft", "--epochs", "-3"], "'epochs' must be greater than 0, got -3.0"),
    (["sft", "--max_length", "1"], "'max_length' must be at least 16, got 1"),
    (["sft", "--batch_size", "0"], "'batch_size' must be at least 1, got 0"),
    (["reward", "--lr", "inf"], "'lr': expected a finite number, got inf"),
    (["sft", "--lr", "nan"], "'lr': expected a finite number"),
    (["sft", "--lr", "0"], "'lr' must be greater than 0"),
    (["ppo", "--mini_batch_size", "0"], "'mini_batch_size' must be at least 1, got 0"),
    (["ppo", "--batch_size", "8", "--mini_batch_size", "16"], "'mini_batch_size' (16) must divide 'batch_size' (8)"),
    (["ppo", "--batch_size", "8", "--mini_batch_size", "3"], "'mini_batch_size' (3) must divide 'batch_size' (8)"),
    (["ppo", "--temperature", "0"], "'temperature' must be greater than 0"),
    (["ppo", "--kl_estimator", "k2"], "'kl_estimator' must be one of k1, k3, got 'k2'"),
    (["sft", "--truncation", "cut"], "'truncation' must be one of truncate, skip"),
    (["sft", "--resume", "maybe"], "'resume' must be one of auto, never, must"),
    (["sft", "--device", "tpu"], "'device' must be auto, cpu, cuda or cuda:N"),
    (["dpo", "--loss", "kto"], "'loss' must be one of dpo, ipo, cdpo, simpo, got 'kto'"),
    (["sft", "--warmup_ratio", "1.5"], "'warmup_ratio' must be between 0 and 1"),
]


@pytest.mark.parametrize("argv,message", BAD_SETTINGS)
def test_bad_setting_is_a_one_line_error(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith(f"rlhf {argv[0]}: error: "), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_on_a_cpu_machine_is_a_clear_error(capsys):
    assert cli.main(["sft", "--device", "cuda"]) == 2
    assert "'device' asks for CUDA, but this machine has no CUDA device" in capsys.readouterr().err


def test_sectioned_config_uses_top_level_keys_and_the_stage_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/x\nmodel: tiny\nbf16: false\nsft:\n  epochs: 0.25\n  lr: 1.0e-3\n"
                    "ppo:\n  steps: 2\n")
    config = cli.parse_stage_args("sft", sft.Config, ["--config", str(path), "--batch_size", "4"])
    assert (config.model, config.bf16, config.epochs, config.lr, config.batch_size) == ("tiny", False, 0.25, 1e-3, 4)
    assert config.output_dir == "runs/x/sft"
    config = cli.parse_stage_args("reward", reward.Config, ["--config", str(path)])
    assert (config.model, config.data) == ("runs/x/sft", "runs/x/pairs/pairs.jsonl")  # the pipeline's wiring
    config = cli.parse_stage_args("dpo", dpo.Config, ["--config", str(path)])
    assert config.output_dir == "runs/x/dpo"


def test_a_file_with_sections_that_are_not_the_pipeline_s_gives_each_command_its_section(tmp_path):
    """configs/arithmetic.yaml holds `grpo:` and `eval:`: `rlhf eval --config` reads its section, not a pipeline."""
    from rlhf import evaluate, grpo

    path = tmp_path / "run.yaml"
    path.write_text("grpo:\n  steps: 3\n  reward_model: ''\neval:\n  models: [tiny]\n  judge: none\n")
    assert cli.parse_stage_args("eval", evaluate.Config, ["--config", str(path)]).models == ["tiny"]
    assert cli.parse_stage_args("grpo", grpo.Config, ["--config", str(path)]).steps == 3


def test_a_key_that_applies_to_nothing_names_the_close_match(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nbf61: false\nsft:\n  epochs: 1\n")
    with pytest.raises(cfg.ConfigError, match="unknown key 'bf61'. Did you mean 'bf16'"):
        cli.parse_stage_args("sft", sft.Config, ["--config", str(path)])
    path.write_text("model: tiny\nsft:\n  epohcs: 1\n")
    with pytest.raises(cfg.ConfigError, match="unknown key 'epohcs'. Did you mean 'epochs'"):
        cli.parse_stage_args("sft", sft.Config, ["--config", str(path)])
    path.write_text("model: tiny\nthreds: 2\nrevise:\n  max_prompts: 2\n")
    from rlhf import constitutional

    with pytest.raises(cfg.ConfigError, match="unknown key 'threds'"):
        cli.parse_stage_args("constitutional revise", constitutional.SUBCOMMANDS["revise"][0], ["--config", str(path)])


@pytest.mark.slow
def test_diverging_lr_exits_non_zero_without_a_checkpoint(tiny_model, write_jsonl, tmp_path):
    """`rlhf sft --lr 1e30` once saved a model of NaN with exit 0."""
    data = write_jsonl("d.jsonl", DEMOS)
    result = subprocess.run([sys.executable, "-m", "rlhf", "sft", "--model", str(tiny_model), "--data", str(data),
                             "--output_dir", str(tmp_path / "o"), "--lr", "1e30", "--batch_size", "2", "--bf16",
                             "false"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
    assert "not saved" in result.stderr or "steps in a row" in result.stderr
    assert not (tmp_path / "o").exists()
