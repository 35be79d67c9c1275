"""A killed stage, rerun with the same command, ends with the weights of a run that was never interrupted, bit for
bit (fp32, CPU, tiny model): SIGKILL right after a state save, and SIGTERM in the middle of a step (which finishes
the step, saves and exits 143). Also: a resume with another config or other data is refused, naming the
difference; `--resume never` starts over."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf import cli, reward

DEMOS = [{"prompt": f"Explain {t} to a 10-year-old.", "completion": f"{t.capitalize()} is a thing in nature, {i}."}
         for i, t in enumerate(["rain", "wind", "snow", "the sun", "the moon", "clouds", "rivers", "trees"])]
PAIRS = [{"prompt": d["prompt"], "chosen": f"A short clear answer number {i}.",
          "rejected": f"answer answer answer {i} that never ends and"} for i, d in enumerate(DEMOS)]
PROMPTS = [{"prompt": d["prompt"]} for d in DEMOS]

# In the child: SIGKILL itself right after the state of step KILL_AFTER_SAVE was written, or SIGTERM itself in the
# middle of step TERM_AT_STEP (after the backward pass, before the optimiser step).
DRIVER = """
import os, signal, sys
from rlhf import checkpoint, cli, guard
kill_after, term_at = int(os.environ.get("KILL_AFTER_SAVE", -1)), int(os.environ.get("TERM_AT_STEP", -1))
save, ok = checkpoint.TrainingState.save, guard.BadSteps.ok
def saving(self, steps_done, *args, **kwargs):
    folder = save(self, steps_done, *args, **kwargs)
    if steps_done == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return folder
def checking(self, step, **values):
    if step == term_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return ok(self, step, **values)
checkpoint.TrainingState.save, guard.BadSteps.ok = saving, checking
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume-data")
    files = {}
    for name, rows in (("demos", DEMOS), ("pairs", PAIRS), ("prompts", PROMPTS)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["reward"] = folder / "reward"
    reward.main(reward.Config(model=str(tiny_model), data=str(files["pairs"]), output_dir=str(files["reward"]),
                              batch_size=4, lr=1e-3, bf16=False, save_every=0))
    return files


def stage_args(stage: str, tiny_model, inputs) -> list[str]:
    common = ["--bf16", "false", "--device", "cpu", "--save_every", "1", "--lr", "1e-3"]
    if stage == "sft":
        return ["sft", "--model", str(tiny_model), "--data", str(inputs["demos"]), "--batch_size", "2", *common]
    if stage == "reward":
        return ["reward", "--model", str(tiny_model), "--data", str(inputs["pairs"]), "--batch_size", "2", *common]
    if stage == "dpo":
        return ["dpo", "--model", str(tiny_model), "--data", str(inputs["pairs"]), "--batch_size", "2", *common]
    return ["ppo", "--policy", str(tiny_model), "--reward_model", str(inputs["reward"]), "--data",
            str(inputs["prompts"]), "--steps", "4", "--batch_size", "4", "--mini_batch_size", "2", "--max_new_tokens",
            "6", "--gold", "false", "--monitor_every", "2", "--monitor_judge", str(inputs["reward"]),
            "--monitor_prompts", str(inputs["prompts"]), "--monitor_size", "4", "--target_kl", "1.0", *common]


def run(args: list[str], out, tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RLHF_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                   **{k: str(v) for k, v in env.items()}}
    return subprocess.run([sys.executable, "-c", DRIVER, *args, "--output_dir", str(out)], capture_output=True,
                          text=True, env=environment, timeout=600)


def final_weights(out) -> dict[str, torch.Tensor]:
    found = {f.name: load_file(str(f)) for f in sorted(out.glob("*.safetensors"))}
    return {f"{file}:{key}": tensor for file, tensors in found.items() for key, tensor in tensors.items()}


def run_here(args: list[str], out, capsys) -> tuple[int, str, str]:
    """The same command in this process (no interpreter start-up): → (exit code, stdout, stderr)."""
    code = cli.main([*args, "--output_dir", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_killed_run_resumes_to_the_same_weights(stage, tiny_model, inputs, tmp_path, capsys):
    args = stage_args(stage, tiny_model, inputs)
    code, _, err = run_here(args, tmp_path / "plain", capsys)
    assert code == 0, err[-2000:]
    expected = final_weights(tmp_path / "plain")
    assert expected and not (tmp_path / "plain_state").exists()  # the state goes once the checkpoint is written

    # SIGTERM in the middle of step 1: the step finishes, its state is saved, exit 128 + 15
    out = tmp_path / "killed"
    termed = run(args, out, tmp_path, TERM_AT_STEP=1)
    assert termed.returncode == 128 + signal.SIGTERM, termed.stderr[-2000:]
    assert "stopped by SIGTERM" in termed.stderr and "Traceback" not in termed.stderr
    assert [p.name for p in (tmp_path / "killed_state").iterdir()] == ["step-000002"]
    assert not out.exists()

    # the same command continues from there, and is SIGKILLed right after the state of step 3 was saved
    killed = run(args, out, tmp_path, KILL_AFTER_SAVE=3)
    assert killed.returncode == -signal.SIGKILL
    assert "resuming from" in killed.stdout and "after 2 steps" in killed.stdout
    assert [p.name for p in (tmp_path / "killed_state").iterdir()] == ["step-000003"]  # keep_last 1

    # and once more, to the end: the weights of the run that was never interrupted, bit for bit
    resumed = run(args, out, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "after 3 steps" in resumed.stdout
    got = final_weights(out)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected
                                                                     if not torch.equal(got[k], expected[k])][:3]
    assert not (tmp_path / "killed_state").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed_logs" / "metrics.jsonl").read_text().splitlines()
             if "loss" in line or "score" in line]
    assert steps == sorted(set(steps))  # the log reads as one run: no step twice


@pytest.mark.slow
def test_resume_refuses_other_config_or_data_and_never_starts_over(tiny_model, inputs, tmp_path, capsys):
    args = stage_args("sft", tiny_model, inputs)
    out = tmp_path / "sft"
    assert run(args, out, tmp_path, KILL_AFTER_SAVE=1).returncode == -signal.SIGKILL
    code, _, err = run_here([*args, "--lr", "2e-3"], out, capsys)
    assert code == 2 and "config key 'lr' (0.001 then, 0.002 now)" in err and "--resume never" in err

    edited = tmp_path / "demos.jsonl"
    edited.write_text(inputs["demos"].read_text() + json.dumps(DEMOS[0]) + "\n")
    code, _, err = run_here([str(edited) if a == str(inputs["demos"]) else a for a in args], out, capsys)
    assert code == 2 and "input 'data'" in err

    code, stdout, err = run_here([*args, "--lr", "2e-3", "--resume", "never"], out, capsys)
    assert code == 0, err[-2000:]
    assert "resuming" not in stdout and "removing the saved state" in stdout
    code, _, err = run_here([*args, "--resume", "must"], tmp_path / "fresh", capsys)
    assert code == 2 and "no saved state" in err
