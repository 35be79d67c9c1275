"""`rlhf study kl-sweep` on a tiny run folder: one PPO run per β, one evaluation, sweep.json, the plot, the table."""

import json
import shutil

import pytest
import torch

from rlhf import cli, report, study, wiring
from rlhf import config as cfg
from rlhf.data import resolve_data_path

# the gold judge (MiniLM) is the slow part on a tiny model: the monitor is off here (tests/test_monitor.py has it)
TINY_SWEEP = ["--betas", "0,0.1", "--steps", "2", "--batch_size", "4", "--mini_batch_size", "2",
              "--max_new_tokens", "6", "--lr", "1e-3", "--monitor_every", "0", "--max_prompts", "4",
              "--eval.harmful_prompts", "none", "--bf16", "false", "--device", "cpu"]


@pytest.fixture
def run_folder(tiny_model, tmp_path):
    """What `rlhf pipeline` leaves: sft/ (here the tiny model itself) and reward/ (a saved one-output head)."""
    from rlhf.models import load_reward_model, load_tokenizer, save_atomic

    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "sft")
    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    save_atomic(run / "reward", model=load_reward_model(tiny_model, torch.device("cpu"), tokenizer),
                tokenizer=tokenizer, json_files={"rlhf_reward_norm.json": {"mean": 0.0, "std": 1.0}})
    return run


@pytest.mark.slow
def test_kl_sweep_end_to_end(run_folder, capsys):
    assert cli.main(["study", "kl-sweep", "--run_dir", str(run_folder), *TINY_SWEEP]) == 0
    out = capsys.readouterr().out
    sweep_dir = run_folder / "sweep"
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["beta"] for p in sweep["points"]] == [0.0, 0.1]
    for point in sweep["points"]:
        for key in ("kl", "gold", "gold_ci", "reward_model", "reward_model_diff_ci", "win_rate", "verdict"):
            assert key in point, key
    assert [r["step"] for r in sweep["curves"]["0"]] == [0, 1] and "gold_score" in sweep["curves"]["0.1"][0]
    assert sweep["seconds"]["total"] > 0 and sweep["claim_holds"] in (True, False)
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each β is a run folder of its own: its PPO checkpoint (at a fixed β) and logs
    rows = [json.loads(line) for line in (sweep_dir / "beta_0" / "ppo_logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in rows] == [0.0, 0.0]
    assert json.loads((sweep_dir / "beta_0.1" / "ppo" / "rlhf_config.json").read_text())["target_kl"] == 0.0
    assert "KL sweep" in out and "β=0.1" in out and "verdict" in out and "took" in out and "Claim" in out

    # a sweep run again keeps a β that finished with the same settings, and reruns one whose settings changed
    config = cli.parse_stage_args("study", study.Config, ["--run_dir", str(run_folder), *TINY_SWEEP])
    runs = []
    _, ran = wiring.run_stage("ppo", runs.append, study.ppo_config(config, run_folder, sweep_dir / "beta_0.1", 0.1),
                              sweep_dir / "beta_0.1" / "stages", road="study", resolve=resolve_data_path)
    assert not ran and not runs
    config.lr = 1e-4
    _, ran = wiring.run_stage("ppo", runs.append, study.ppo_config(config, run_folder, sweep_dir / "beta_0.1", 0.1),
                              sweep_dir / "beta_0.1" / "stages", road="study", resolve=resolve_data_path)
    assert ran and runs[0].lr == 1e-4
    # the report of the run folder shows the sweep
    made = report.main(report.Config(run_dir=str(run_folder)))
    page = (run_folder / "report.html").read_text()
    assert made["images"] == 1 and "KL sweep" in page


def test_kl_sweep_refuses_to_let_its_wiring_be_overridden(run_folder):
    config = cfg.build(study.Config, {"run_dir": str(run_folder), "ppo": {"beta": 0.3}})
    with pytest.raises(cfg.ConfigError, match="'ppo.beta' is set by the study"):
        study.main(config)
    config = cfg.build(study.Config, {"run_dir": str(run_folder), "eval": {"models": ["x"]}})
    with pytest.raises(cfg.ConfigError, match="'eval.models' is set by the study"):
        study.main(config)
    with pytest.raises(ValueError, match="unknown study"):
        study.main(cfg.build(study.Config, {"run_dir": str(run_folder), "study": "lr-sweep"}))
    with pytest.raises(FileNotFoundError, match="needs a run folder"):
        study.main(cfg.build(study.Config, {"run_dir": str(run_folder / "nowhere")}))


@pytest.mark.parametrize("gold_ci,reward_ci,expected", [
    ([0.01, 0.05], [0.2, 0.6], "both rose"),
    ([-0.02, 0.03], [0.2, 0.6], "RM rose, gold stalled: over-optimised"),
    ([-0.09, -0.01], [0.2, 0.6], "RM rose, gold fell: over-optimised"),
    ([-0.02, 0.03], [-0.1, 0.2], "no clear change"),
])
def test_verdict_reads_the_paired_intervals(gold_ci, reward_ci, expected):
    assert study.verdict({"gold_diff_ci": gold_ci, "reward_model_diff_ci": reward_ci}) == expected


TINY_COMPARISON = ["--steps", "2", "--batch_size", "4", "--mini_batch_size", "2", "--group_size", "2",
                   "--max_new_tokens", "6", "--lr", "1e-3", "--monitor_every", "0", "--max_prompts", "4",
                   "--eval.harmful_prompts", "none", "--bf16", "false", "--device", "cpu"]


@pytest.mark.slow
def test_critic_free_comparison_end_to_end(run_folder, capsys):
    assert cli.main(["study", "critic-free", "--run_dir", str(run_folder), *TINY_COMPARISON]) == 0
    out = capsys.readouterr().out
    folder = run_folder / "critic_free"
    comparison = json.loads((folder / "comparison.json").read_text())
    assert [p["name"] for p in comparison["points"]] == ["PPO", "GRPO", "Dr. GRPO", "RLOO"]
    for point in comparison["points"]:
        for key in ("gold", "gold_ci", "win_rate", "win_rate_ci", "kl_to_reference", "length_tokens", "seconds"):
            assert key in point, key
        assert [r["step"] for r in comparison["curves"][point["method"]]] == [0, 1]
    assert (folder / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every method sampled the same answers per step: PPO one to each of 4 prompts, the groups 2 to each of 2
    for method, advantage, group_size, kl_in, aggregation in [("gae", "gae", 1, "reward", "token"),
                                                              ("grpo", "grpo", 2, "loss", "token"),
                                                              ("dr_grpo", "dr_grpo", 2, "loss", "constant"),
                                                              ("rloo", "rloo", 2, "reward", "token")]:
        saved = json.loads((folder / method / "ppo" / "rlhf_config.json").read_text())
        assert (saved["advantage"], saved["group_size"], saved["kl_in"], saved["loss_aggregation"],
                saved["batch_size"]) == (advantage, group_size, kl_in, aggregation, 4)
        assert (folder / method / "ppo" / "value_head.safetensors").is_file() == (method == "gae")
    assert "Critic-free comparison" in out and "Dr. GRPO" in out and "wall time (min)" in out
    made = report.main(report.Config(run_dir=str(run_folder)))
    assert made["images"] == 1 and "critic-free methods" in (run_folder / "report.html").read_text()


def test_critic_free_comparison_refuses_what_cannot_be_compared(run_folder):
    with pytest.raises(ValueError, match="methods must be some of"):
        study.main(cfg.build(study.Config, {"run_dir": str(run_folder), "study": "critic-free", "methods": ["a2c"]}))
    with pytest.raises(ValueError, match="must be a multiple of group_size"):
        study.main(cfg.build(study.Config, {"run_dir": str(run_folder), "study": "critic-free", "batch_size": 6,
                                            "group_size": 4}))
    config = cfg.build(study.Config, {"run_dir": str(run_folder), "study": "critic-free", "ppo": {"advantage": "x"}})
    with pytest.raises(cfg.ConfigError, match="'ppo.advantage' is set by the study"):
        study.main(config)
