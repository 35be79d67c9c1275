"""More than one process: SFT, reward and DPO under `torchrun --nproc_per_node 2` (gloo, CPU, fp32, tiny model) take
the same steps as one process with the same global batch and seed: the same per-step losses and gradient norms, the
same final weights, saved once as a plain Hugging Face folder. FSDP2 really shards (each rank holds about half of the
parameters and of the optimiser state), and a rank that fails stops the whole run with its error shown once.

The global batch is 3 over 2 processes, so the ranks hold 2 and 1 examples: a mean of the ranks' means would differ
from the global mean, and the test would see it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf import checkpoint, distributed, dpo, ppo, reward, sft
from rlhf.tracking import read_jsonl

DEMOS = [{"prompt": f"Explain {t} to a 10-year-old.", "completion": f"{t.capitalize()} is {'a thing ' * (i % 3)}in "
                                                                     f"nature, {i}."}
         for i, t in enumerate(["rain", "wind", "snow", "the sun", "the moon", "clouds", "rivers", "trees"])]
PAIRS = [{"prompt": d["prompt"], "chosen": f"A short clear answer number {i}.",
          "rejected": f"answer answer answer {i} that never ends and" + " and" * (i % 3)} for i, d in enumerate(DEMOS)]
STAGES = {"sft": sft, "reward": reward, "dpo": dpo, "dpo-precomputed": dpo}
# 8 examples, a global batch of 3, three steps in each stage
SETTINGS = {"sft": {"epochs": 1.5}, "reward": {"epochs": 1.125, "eval_fraction": 0.0},
            "dpo": {"epochs": 1.125, "eval_fraction": 0.0},
            # the reference's log-probs of every pair before training and the held-out pairs after it, split over the
            # processes: 7 training pairs (4 and 3), 1 held out (one process has none: no forward pass, which must
            # leave FSDP's state as it leaves the other's)
            "dpo-precomputed": {"epochs": 1.3, "eval_fraction": 0.125, "precompute_reference": True}}

# Answers that depend only on the prompt and the answer's place in its group, never on the weights or the random
# stream: one process and two processes then train on the same rollout batch, and their updates can be compared
FAKE_SAMPLING = """
import torch
from rlhf.data import encode_prompt, pad_left
from rlhf.rollout import Rollout, stop_ids, truncate_at_eos

def sample(model, tokenizer, prompts, max_new_tokens, temperature=0.7, **kwargs):
    seen, responses = {}, []
    for messages in prompts:
        text = str(messages)
        place = seen[text] = seen.get(text, -1) + 1
        code = sum(map(ord, text)) + 7 * place
        length = min(max_new_tokens, 2 + code % 5)
        answer = [10 + (code * (j + 3)) % 40 for j in range(length)]
        responses.append(answer[:-1] + [stop_ids(model, tokenizer)[0]] if code % 3 else answer)
    prompt_ids, prompt_mask = pad_left([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    width = max(len(r) for r in responses)
    padded = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in responses])
    response_ids, response_mask, ended = truncate_at_eos(padded, stop_ids(model, tokenizer), tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response_ids.masked_fill(~response_mask, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended, [t.strip() for t in texts])
"""

# Run under torchrun: records each rank's local parameter and optimiser sizes before the final save, and with
# FAIL_RANK set that rank raises in the middle of step 1 (after its backward pass, while the other waits for it)
DRIVER = """
import json, os, sys
from torch.distributed.fsdp import FSDPModule
from rlhf import cli, distributed, dpo, guard, ppo, reward, sft
record, fail_rank = os.environ["RECORD_DIR"], int(os.environ.get("FAIL_RANK", -1))
if os.environ.get("FAKE_SAMPLING"):
    import fake_sampling
    ppo.sample = fake_sampling.sample
optimizers = []
for stage in (sft, reward, dpo, ppo):
    def optimizer_and_schedule(*args, _make=stage.optimizer_and_schedule, **kwargs):
        made = _make(*args, **kwargs)
        optimizers.append(made[0])
        return made
    def gathered_for_saving(model, _gather=stage.gathered_for_saving):
        for module in model.modules():  # a root unit stays gathered after a forward pass without gradient (the
            if isinstance(module, FSDPModule):  # reward model's evaluation): count what each rank keeps
                module.reshard()
        sizes = distributed.local_sizes(model, optimizers[-1])
        with open(os.path.join(record, f"rank{distributed.rank()}.json"), "w") as f:
            json.dump(sizes, f)
        return _gather(model)
    stage.optimizer_and_schedule, stage.gathered_for_saving = optimizer_and_schedule, gathered_for_saving
stop_after = int(os.environ.get("STOP_AFTER", -1))
from rlhf import checkpoint
stop_if_asked = checkpoint.TrainingState.stop_if_asked
def stopping(self, steps_done, *args):  # as if SIGTERM reached rank 1 alone after that step
    if steps_done == stop_after and distributed.rank() == 1:
        self.signal_number = 15
    return stop_if_asked(self, steps_done, *args)
checkpoint.TrainingState.stop_if_asked = stopping
ok = guard.BadSteps.ok
def checking(self, step, **values):
    if step == 1 and distributed.rank() == fail_rank:
        raise ValueError(f"a failure on rank {fail_rank} only")
    return ok(self, step, **values)
guard.BadSteps.ok = checking
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("distributed-data")
    paths = {}
    for name, rows in (("demos", DEMOS), ("pairs", PAIRS)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "driver.py").write_text(DRIVER)
    (folder / "fake_sampling.py").write_text(FAKE_SAMPLING)
    paths["driver"] = folder / "driver.py"
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": d["prompt"]}) + "\n" for d in DEMOS))
    paths["prompts"] = prompts
    paths["reward"], paths["tiny_model"] = folder / "reward", tiny_model
    reward.main(reward.Config(model=str(tiny_model), data=str(paths["pairs"]), output_dir=str(paths["reward"]),
                              batch_size=4, lr=1e-3, bf16=False, save_every=0))
    return paths


def settings(stage: str, tiny_model, files) -> dict:
    return {"model": str(tiny_model), "data": str(files["demos" if stage == "sft" else "pairs"]), "batch_size": 3,
            "lr": 1e-4, "bf16": False, "device": "cpu", "save_every": 0, "seed": 3, **SETTINGS[stage]}


def torchrun(args: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RLHF_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                   "RECORD_DIR": str(tmp_path), **{k: str(v) for k, v in env.items()}}
    environment.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_take_the_steps_of_one(stage, tiny_model, files, tmp_path):
    values = settings(stage, tiny_model, files)
    module = STAGES[stage]
    one = tmp_path / "one"
    module.main(module.Config(**values, output_dir=str(one)))

    two = tmp_path / "two"
    command = stage.split("-")[0]
    args = [str(files["driver"]), command, *[f"--{k}={v}" for k, v in values.items()], f"--output_dir={two}"]
    result = torchrun(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if values.get("eval_fraction"):  # the held-out numbers, computed a part per process
        held_out = [[r for r in read_jsonl(tmp_path / f"{run}_logs" / "metrics.jsonl") if "eval_loss" in r][0]
                    for run in ("one", "two")]
        for key in ("eval_loss", "eval_margin", "eval_accuracy"):
            assert held_out[1][key] == pytest.approx(held_out[0][key], rel=1e-5, abs=1e-6), (key, held_out)

    # the same losses and gradient norms, step by step, logged once (rank 0)
    rows_one = [r for r in read_jsonl(tmp_path / "one_logs" / "metrics.jsonl") if "loss" in r]
    rows_two = [r for r in read_jsonl(tmp_path / "two_logs" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows_two] == [0, 1, 2] == [r["step"] for r in rows_one]
    for key in ("loss", "grad_norm"):
        a, b = torch.tensor([r[key] for r in rows_one]), torch.tensor([r[key] for r in rows_two])
        assert relative_difference(a, b) < 1e-5, (key, a, b)
    assert rows_one[-1]["loss"] != rows_one[0]["loss"]  # the steps did move the weights

    # the same final weights, in one plain folder that transformers loads; no training state left behind
    weights_one, weights_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert sorted(weights_one) == sorted(weights_two)
    start = load_file(str(tiny_model / "model.safetensors"))
    largest = max(w.abs().max().item() for w in weights_one.values())
    moved = max((weights_one[k] - start[k]).abs().max().item() for k in weights_one if k in start)
    difference = max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one)
    assert difference < 1e-5 * largest < moved / 10, (difference, largest, moved)
    if command == "reward":
        from transformers import AutoModelForSequenceClassification as Auto
        norm_one, norm_two = (json.loads((d / "rlhf_reward_norm.json").read_text()) for d in (one, two))
        assert norm_two["mean"] == pytest.approx(norm_one["mean"], rel=1e-5, abs=1e-6)
    else:
        from transformers import AutoModelForCausalLM as Auto
    assert Auto.from_pretrained(two).num_parameters() == Auto.from_pretrained(one).num_parameters()
    assert not (tmp_path / "two_state").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".two")] == []

    # FSDP2 sharded: each rank holds about half of every parameter and its two Adam moments
    sizes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = sizes[0]["full_parameters"]
    assert sizes[0]["parameters"] + sizes[1]["parameters"] == full
    for rank_sizes in sizes:
        assert 0.4 * full < rank_sizes["parameters"] < 0.6 * full, sizes
        assert rank_sizes["optimizer"] == 2 * rank_sizes["parameters"], sizes


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_lora_under_fsdp_takes_the_steps_of_one_process(stage, tiny_model, files, tmp_path):
    """LoRA with FSDP2 at 2 processes (the frozen base sharded with the adapter beside it; DPO's reference is the
    base with the adapter off): the same losses as one process, and one merged folder with the same weights."""
    values = {**settings(stage, tiny_model, files), "lora_r": 4, "lr": 1e-2}
    module = STAGES[stage]
    one = tmp_path / "one"
    module.main(module.Config(**values, output_dir=str(one)))
    two = tmp_path / "two"
    result = torchrun([str(files["driver"]), stage, *[f"--{k}={v}" for k, v in values.items()],
                       f"--output_dir={two}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows_one = [r for r in read_jsonl(tmp_path / "one_logs" / "metrics.jsonl") if "loss" in r]
    rows_two = [r for r in read_jsonl(tmp_path / "two_logs" / "metrics.jsonl") if "loss" in r]
    a, b = torch.tensor([r["loss"] for r in rows_one]), torch.tensor([r["loss"] for r in rows_two])
    assert len(a) == len(b) == 3 and relative_difference(a, b) < 1e-5, (a, b)
    start = load_file(str(tiny_model / "model.safetensors"))
    weights_one, weights_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert sorted(weights_one) == sorted(weights_two)  # merged: plain weight names, no adapter left
    moved = max((weights_one[k] - start[k]).abs().max().item() for k in weights_one if k in start)
    difference = max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one)
    assert difference < moved / 100 and moved > 1e-4, (difference, moved)
    sizes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sizes[0]["parameters"] + sizes[1]["parameters"] == sizes[0]["full_parameters"]


PPO_SETTINGS = {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 6, "lr": 1e-3,
                "bf16": False, "device": "cpu", "gold": False, "save_every": 0, "seed": 3, "monitor_every": 0}
ADVANTAGES = {"gae": {}, "gae-critic": {"critic": "model"},
              "grpo": {"advantage": "grpo", "group_size": 2, "kl_in": "loss", "loss_aggregation": "sequence"}}


def ppo_settings(files, **changes) -> dict:
    return {"policy": str(files["tiny_model"]), "reward_model": str(files["reward"]), "data": str(files["prompts"]),
            **PPO_SETTINGS, **changes}


@pytest.mark.parametrize("advantage", list(ADVANTAGES))
def test_two_processes_take_the_ppo_update_of_one(advantage, files, tmp_path, monkeypatch):
    """Given the same rollout batches (answers that do not depend on the weights), the PPO update at 2 processes is
    the update of 1: the same scores, KL, losses, gradient norms and final weights (value head included). Each
    process samples and scores its half of the prompts, computes its half of the log-probabilities, and takes half
    of every mini-batch."""
    monkeypatch.syspath_prepend(str(files["driver"].parent))
    import fake_sampling

    monkeypatch.setattr(ppo, "sample", fake_sampling.sample)
    values = ppo_settings(files, **ADVANTAGES[advantage])
    one = tmp_path / "one"
    ppo.main(ppo.Config(**values, output_dir=str(one)))
    two = tmp_path / "two"
    args = [str(files["driver"]), "ppo", *[f"--{k}={v}" for k, v in values.items()], f"--output_dir={two}"]
    result = torchrun(args, tmp_path, FAKE_SAMPLING=1)
    assert result.returncode == 0, result.stderr[-3000:]

    rows_one = read_jsonl(tmp_path / "one_logs" / "metrics.jsonl")
    rows_two = read_jsonl(tmp_path / "two_logs" / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [0, 1] == [r["step"] for r in rows_one]
    keys = ["score", "kl", "response_length", "total_reward", "policy_loss", "clipfrac", "grad_norm", "ratio"]
    keys += ["value_loss", "returns"] if advantage.startswith("gae") else ["kl_loss", "advantage_abs"]
    for key in keys:
        a, b = torch.tensor([r[key] for r in rows_one]), torch.tensor([r[key] for r in rows_two])
        assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-5 * a.abs().max().clamp(min=1), (key, a, b)
    assert abs(rows_one[1]["kl"]) > 1e-4  # the first step moved the policy away from the reference

    start = load_file(str(files["tiny_model"] / "model.safetensors"))
    weights_one, weights_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    largest = max(w.abs().max().item() for w in weights_one.values())
    moved = max((weights_one[k] - start[k]).abs().max().item() for k in weights_one if k in start)
    difference = max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one)
    # Adam divides each gradient by its own running size, so a weight whose gradient is at float-noise level moves
    # by up to lr either way: the weights agree to a small part of how far they moved, not to 1e-6 (measured:
    # 1.7e-5 for GRPO, ~1e-7 for GAE, against moves of 5e-3 at lr 1e-3)
    print(f"{advantage}: largest weight difference {difference:.2e}, largest move {moved:.2e}")
    assert difference < moved / 100 and moved > 1e-3, (difference, largest, moved)
    if advantage == "gae":
        head_one, head_two = (load_file(str(d / "value_head.safetensors")) for d in (one, two))
        assert max((head_one[k] - head_two[k]).abs().max().item() for k in head_one) < 1e-5
        assert head_one["weight"].abs().max() > 0  # the zero-initialised head learnt something
    if advantage == "gae-critic":  # the separate critic, sharded too, trained alike and saved whole
        critic_one, critic_two = (load_file(str(d / "critic" / "model.safetensors")) for d in (one, two))
        critic_start = load_file(str(files["reward"] / "model.safetensors"))
        moved = max((critic_one[k] - critic_start[k]).abs().max().item() for k in critic_one)
        difference = max((critic_one[k] - critic_two[k]).abs().max().item() for k in critic_one)
        assert sorted(critic_one) == sorted(critic_two) and difference < moved / 100, (difference, moved)

    # the policy sharded: each rank holds about half of it and of its Adam moments (plus the whole value head)
    sizes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = sizes[0]["full_parameters"]
    for rank_sizes in sizes:
        assert 0.4 * full < rank_sizes["parameters"] < 0.6 * full, sizes


@pytest.mark.parametrize("changes", [{"advantage": "rloo", "group_size": 2, "dynamic_sampling": True},
                                     {"lora_r": 4}], ids=["rloo-dynamic-sampling", "gae-lora"])
def test_a_whole_ppo_run_at_two_processes_samples_its_own_answers(changes, files, tmp_path):
    """Real sampling at 2 processes (each its own prompts, with the weights gathered once per round), a critic-free
    advantage with dynamic sampling or PPO with LoRA (the reference: the sharded policy with its adapter off), and
    the monitor (rank 0, weights gathered): finite metrics and one checkpoint that plain transformers loads."""
    values = ppo_settings(files, **changes, monitor_every=1, monitor_size=4, monitor_prompts=str(files["prompts"]),
                          monitor_judge=str(files["reward"]))
    out = tmp_path / "run"
    result = torchrun([str(files["driver"]), "ppo", *[f"--{k}={v}" for k, v in values.items()],
                       f"--output_dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run_logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("score", "kl", "policy_loss", "grad_norm", "response_length", "monitor/reward_model"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), key
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run", "run_logs"]


def test_pairs_and_eval_at_two_processes_answer_every_prompt_once_in_order(files, tmp_path):
    """`rlhf pairs` and `rlhf eval` under torchrun: each process answers its part of the prompts; rank 0 writes one
    file with every prompt once, in the order of the prompts file, as one process would."""
    prompts = [json.loads(line)["prompt"] for line in files["prompts"].read_text().splitlines()]
    common = ["--max_new_tokens=6", "--bf16=False", "--device=cpu", f"--data={files['prompts']}"]
    result = torchrun([str(files["driver"]), "pairs", f"--model={files['tiny_model']}", "--annotator=none",
                       "--n_responses=2", f"--output_dir={tmp_path / 'pairs'}", *common], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(tmp_path / "pairs" / "candidates.jsonl")
    assert [r["prompt"] for r in rows] == prompts and all(len(r["responses"]) == 2 for r in rows)

    result = torchrun([str(files["driver"]), "eval", f"--models={files['tiny_model']}", f"--judge={files['reward']}",
                       f"--harmful_prompts={files['prompts']}", f"--output_dir={tmp_path / 'eval'}", *common],
                      tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["prompts"] == len(prompts) and results["behaviour_prompts"] == {"harmful": len(prompts)}
    samples = read_jsonl(tmp_path / "eval" / "samples.jsonl")
    assert [r["prompt"] for r in samples] == prompts
    assert len(read_jsonl(tmp_path / "eval" / "harmful_samples.jsonl")) == len(prompts)
    assert all(isinstance(r[f"{files['tiny_model']}_gold"], float) for r in samples)


def test_the_tiny_pipeline_runs_at_two_processes_and_a_rerun_skips_it(files, tmp_path):
    """`rlhf pipeline` under torchrun: every stage at 2 processes, one set of checkpoints and stage markers written
    by rank 0, the eval table printed once; run again, every process skips every stage."""
    import yaml

    run = tmp_path / "run"
    stages = {"sft": {"epochs": 0.1, "batch_size": 8, "lr": 1e-3}, "pairs": {"max_prompts": 16, "max_new_tokens": 8},
              "reward": {"batch_size": 8, "lr": 1e-3},
              "ppo": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 8, "lr": 1e-4},
              "dpo": {"batch_size": 4, "lr": 1e-3}, "eval": {"max_prompts": 8, "max_new_tokens": 8}}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(run), "model": str(files["tiny_model"]), "bf16": False,
                                      "method": "both", **stages}))
    result = torchrun([str(files["driver"]), "pipeline", "--config", str(config)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("gold win rate") == 1, result.stdout[-3000:]
    assert sorted(p.stem for p in (run / "stages").iterdir()) == ["dpo", "eval", "pairs", "ppo", "reward", "sft"]
    eval_rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    assert len(eval_rows) == 3 and all("win_rate" in row for row in eval_rows[1:])
    from transformers import AutoModelForCausalLM

    for stage in ("sft", "ppo", "dpo"):
        AutoModelForCausalLM.from_pretrained(run / stage)

    again = torchrun([str(files["driver"]), "pipeline", "--config", str(config)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 6, again.stdout[-3000:]


def test_a_failing_rank_stops_the_run_with_its_error_shown_once(tiny_model, files, tmp_path):
    values = settings("sft", tiny_model, files)
    args = [str(files["driver"]), "sft", *[f"--{k}={v}" for k, v in values.items()], f"--output_dir={tmp_path / 'out'}"]
    # rank 0 waits for rank 1 in the step's collectives; torchrun stops it when rank 1 exits (the subprocess
    # timeout bounds the test: a hang fails it)
    result = torchrun(args, tmp_path, FAIL_RANK=1)
    assert result.returncode != 0
    assert result.stderr.count("rlhf sft: error (process 1 of 2): a failure on rank 1 only") == 1, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_settings_that_do_not_work_with_processes_are_refused_by_name(tiny_model, files, tmp_path, monkeypatch):
    with pytest.raises(distributed.SettingError, match="fsdp: compile"):
        sft.main(sft.Config(**{**settings("sft", tiny_model, files), "compile": True, "fsdp": True},
                            output_dir=str(tmp_path / "compiled")))
    # a state saved by one process without FSDP does not resume under torchrun: it says so instead of ignoring it
    alone = tmp_path / "alone"
    sft.main(sft.Config(**{**settings("sft", tiny_model, files), "save_every": 1}, output_dir=str(alone)))
    state = checkpoint.TrainingState("sft", sft.Config(**settings("sft", tiny_model, files), output_dir=str(alone)),
                                     {}, alone)
    state.save(1, {"model": torch.nn.Linear(2, 2)}, torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()),
               torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), lambda s: 1),
               {})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.SettingError, match="resume: .* was saved by one process without FSDP, and this "
                                                       "run has 2 processes"):
        state.resume({"model": torch.nn.Linear(2, 2)}, None, None)


@pytest.mark.parametrize("stage,resumers", [("sft", (2, 1)), ("dpo", (2, 1)), ("ppo", (2,))])
def test_a_stopped_run_at_two_processes_resumes_at_two_or_one(stage, resumers, tiny_model, files, tmp_path):
    """save_every 1 under torchrun: each process writes its shards (DCP) and its RNGs, rank 0 the rest. A SIGTERM
    that reaches one process stops both after the same step, saved; the rerun at 2 processes continues to the same
    losses and weights as a run never stopped, and so does a rerun in one process (DCP reshards on load; not for
    PPO, whose answers at one process are not those of two)."""
    values = {**(ppo_settings(files, steps=3) if stage == "ppo" else settings(stage, tiny_model, files)),
              "save_every": 1}
    loss = "policy_loss" if stage == "ppo" else "loss"
    command = [str(files["driver"]), stage, *[f"--{k}={v}" for k, v in values.items()]]

    whole = torchrun([*command, f"--output_dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    weights = load_file(str(tmp_path / "whole" / "model.safetensors"))
    losses = [r[loss] for r in read_jsonl(tmp_path / "whole_logs" / "metrics.jsonl") if loss in r]

    for resumed_by in resumers:
        out = tmp_path / f"stopped{resumed_by}"
        stopped = torchrun([*command, f"--output_dir={out}"], tmp_path, STOP_AFTER=2)
        # each process exits 128 + SIGTERM (torchrun itself 1), saying where the state is
        assert stopped.returncode != 0 and "exitcode: 143" in stopped.stderr, stopped.stderr[-3000:]
        assert f"rlhf {stage}: {stage}: stopped by SIGTERM; state saved in" in stopped.stderr
        state = tmp_path / f"stopped{resumed_by}_state" / "step-000002"
        assert sorted(p.name for p in (state / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert (state / "rng-rank0.pt").is_file() and (state / "rng-rank1.pt").is_file()
        assert json.loads((state / "meta.json").read_text())["processes"] == 2
        assert not out.exists()
        if resumed_by == 2:
            again = torchrun([*command, f"--output_dir={out}"], tmp_path)
            assert again.returncode == 0, again.stderr[-3000:]
        else:
            module = STAGES[stage]
            module.main(module.Config(**values, output_dir=str(out)))
        rows = [r for r in read_jsonl(tmp_path / f"stopped{resumed_by}_logs" / "metrics.jsonl") if loss in r]
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert relative_difference(torch.tensor(losses), torch.tensor([r[loss] for r in rows])) < 1e-5
        resumed = load_file(str(out / "model.safetensors"))
        difference = max((weights[k] - resumed[k]).abs().max().item() for k in weights)
        assert difference < 1e-6, (resumed_by, difference)
        assert not (tmp_path / f"stopped{resumed_by}_state").exists()


def test_a_global_batch_splits_into_slices_that_differ_by_at_most_one():
    batch = list(range(7))
    parts = [distributed.shard(batch, index, 3) for index in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.shard(batch) == batch  # one process: all of it
    with pytest.raises(distributed.SettingError, match="batch_size: a batch of 2 cannot be split over 3"):
        distributed.shard(batch[:2], 0, 3)


def test_an_fsdp_units_parameter_groups_are_read_from_either_torch_layout():
    """torch 2.13 keeps a list (`_fsdp_param_groups`), torch 2.11 one group or None (`_fsdp_param_group`)."""
    from types import SimpleNamespace

    first, second = object(), object()
    assert distributed._param_groups(SimpleNamespace(_fsdp_param_groups=[first, second])) == [first, second]
    assert distributed._param_groups(SimpleNamespace(_fsdp_param_group=first)) == [first]
    assert distributed._param_groups(SimpleNamespace(_fsdp_param_group=None)) == []


def test_fsdp_setting_is_checked(tiny_model, files):
    from rlhf import config as cfg

    with pytest.raises(cfg.ConfigError, match="'fsdp': expected"):
        cfg.build(sft.Config, {"fsdp": "sometimes"})
    assert cfg.build(dpo.Config, {"fsdp": "auto"}).fsdp == "auto"
    assert distributed.use_fsdp("auto") is False and distributed.use_fsdp(True) is True  # one process here


def test_activation_checkpointing_recomputes_each_layer_with_the_same_gradients(tiny_model):
    from rlhf.models import load_causal_lm

    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    gradients, calls = [], []
    for recompute in (False, True):
        model = load_causal_lm(tiny_model, torch.device("cpu"))
        if recompute:
            assert distributed.checkpoint_activations(model) == 2
        inner = distributed.decoder_layers(model)[0].mlp  # the recomputation calls the layer's own forward
        count = [0]
        inner.register_forward_pre_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        model(input_ids=ids, use_cache=False).logits.logsumexp(-1).mean().backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # the layer ran again in the backward pass
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-7)


LEAVER = """
import os, sys, torch
from rlhf import cli, distributed
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
code = int(sys.argv[2])
cli.run_command = lambda argv: (print("printed before the end", end=""), distributed.stop(), code)[-1]
cli.main(["sft"])
print("not reached: the process ended inside cli.main")
"""


def test_a_command_that_left_a_process_group_ends_with_its_own_code_and_its_output(tmp_path):
    """After leaving a process group the command's process ends at once (gloo's threads can abort it in the
    interpreter's teardown): with the command's exit code, its output flushed, and nothing after `cli.main` run. A
    process that never joined a group returns from `cli.main` as usual."""
    import socket

    script = tmp_path / "leaver.py"
    script.write_text(LEAVER)
    for code in (0, 143):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = subprocess.run([sys.executable, str(script), str(port), str(code)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == code and result.stdout == "printed before the end", result.stderr[-2000:]
    assert distributed.exit_now_if_left(3) == 3  # this process never left a group
