"""SFT and PPO at 1 and N processes under torchrun: steps per second, tokens per second, MFU and memory per process.

    # a CPU, SmolLM2-135M, gloo: 1 process of one core against 2 processes of one core each
    python bench/distributed_scaling.py --device cpu --model smollm2 --processes 1,2 --json bench/results/X.json
    # a GPU, 1 rank (NCCL), Qwen2-0.5B's shape with random weights, bf16, FSDP2 on and off
    python bench/distributed_scaling.py --device cuda --model qwen2-0.5b --processes 1 --fsdp true,false \
        --peak_tflops 989 --json X.json

Each configuration runs in its own `torchrun --standalone` (one thread per process on the CPU), takes one warm-up
step and then `--steps` timed ones (the training generators of `rlhf.sft` and `rlhf.ppo`, as a user's run would
take them, with no periodic saving). Per process it records the peak memory (RSS on the CPU,
`torch.cuda.max_memory_allocated` on a GPU) and the parameter and AdamW-moment elements it holds
(`rlhf.distributed.local_sizes`): at 2 processes with FSDP2 each should hold about half. SFT's tokens are the real
tokens of the global batch; MFU = 6 · parameters · tokens/s over `--peak_tflops`. PPO's figure is episodes (sampled
answers) per second over whole iterations: sampling, scoring and the update.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_models(model: str, tmp: Path) -> tuple[Path, Path]:
    """(policy folder, reward-model folder): the reward model is the policy's backbone with a seeded score head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import build_tiny_model, load_tokenizer, resolve_model_path

    if model == "qwen2-0.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        policy = tmp / "qwen2_shaped"
        if not (policy / "config.json").is_file():
            tokenizer = load_tokenizer(resolve_model_path("default"))
            torch.manual_seed(0)  # Qwen2-0.5B's shape, the embedded tokenizer's vocabulary (nothing is downloaded)
            config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864,
                                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                 max_position_embeddings=4096, tie_word_embeddings=True,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            Qwen2ForCausalLM(config).save_pretrained(policy)
            tokenizer.save_pretrained(policy)
    elif model == "tiny":
        policy = build_tiny_model(tmp / "tiny", seed=0)
    else:
        policy = resolve_model_path("default")
    reward = tmp / f"{model}_reward"
    if not (reward / "config.json").is_file():
        torch.manual_seed(0)
        scorer = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
        tokenizer = load_tokenizer(policy)
        scorer.config.pad_token_id = tokenizer.pad_token_id
        scorer.save_pretrained(reward)
        tokenizer.save_pretrained(reward)
    return Path(policy), reward


def worker(args) -> None:
    """One process of one configuration: run the stage, time its steps, write this rank's numbers."""
    import torch

    from rlhf import config as cfg
    from rlhf import distributed, ppo, sft

    policy, reward_dir = Path(args.policy), Path(args.reward)
    fsdp = {"true": True, "false": False, "auto": "auto"}[args.fsdp_setting]
    held = {}
    parallel = distributed.parallel

    def keep_first(model, *a, **kw):  # the trained model is the first one a stage makes parallel
        made = parallel(model, *a, **kw)
        held.setdefault("model", made)
        return made

    distributed.parallel = keep_first
    for stage in (sft, ppo):
        make = stage.optimizer_and_schedule

        def optimizer_and_schedule(*a, _make=make, **kw):
            made = _make(*a, **kw)
            held.setdefault("optimizer", made[0])
            return made

        stage.optimizer_and_schedule = optimizer_and_schedule
    out = Path(args.out) / f"{args.stage}_{args.world}_{args.fsdp_setting}"
    common = {"device": args.device, "fsdp": fsdp, "save_every": 0, "seed": 0}
    steps = args.steps + 1
    if args.stage == "sft":
        batch = args.batch or (64 if args.device == "cuda" else 8)
        config = cfg.build(sft.Config, {**common, "model": str(policy), "output_dir": str(out), "batch_size": batch,
                                        "epochs": 1000, "log_every": 1})  # stopped after `steps` steps below
        generator = sft.training(config)
    else:
        batch = args.batch or (64 if args.device == "cuda" else 8)
        config = cfg.build(ppo.Config, {**common, "policy": str(policy), "reward_model": str(reward_dir),
                                        "output_dir": str(out), "steps": steps, "batch_size": batch,
                                        "mini_batch_size": batch // 2, "ppo_epochs": 1, "max_new_tokens": 64,
                                        "normalize_reward": False, "gold": False, "monitor_every": 0,
                                        "generation_batch_size": batch})
        generator = ppo.training(config)
    times, tokens = [], []
    began = time.perf_counter()
    for step, row in enumerate(generator):
        if args.device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step > 0:  # the first step compiles, allocates and warms the caches
            times.append(now - began)
            if args.stage == "sft":
                tokens.append(float(distributed.reduce_sum(float(row["batch_tokens"]))))
        began = now
        if step + 1 >= steps:
            break
    sizes = distributed.local_sizes(held["model"], held.get("optimizer"))
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"stage": args.stage, "processes": args.world, "fsdp": fsdp, "rank": distributed.rank(),
              "batch_size": batch, "step_seconds": times, "tokens_per_step": tokens, "peak_memory_mib": peak,
              **sizes}
    Path(args.out, f"{args.stage}_{args.world}_{args.fsdp_setting}_rank{distributed.rank()}.json").write_text(
        json.dumps(result))
    distributed.barrier()
    distributed.stop()


def launch(args, stage: str, processes: int, fsdp: str, policy: Path, reward: Path, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one core per process
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--worker", "--stage", stage, "--world", str(processes), "--fsdp-setting", fsdp,
               "--device", args.device, "--steps", str(args.steps), "--batch", str(args.batch),
               "--policy", str(policy), "--reward", str(reward), "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"{stage} at {processes} processes (fsdp {fsdp}) failed")
    return [json.loads((out / f"{stage}_{processes}_{fsdp}_rank{r}.json").read_text()) for r in range(processes)]


def summarise(ranks: list[dict], parameters: int, peak_tflops: float) -> dict:
    seconds = sum(ranks[0]["step_seconds"]) / len(ranks[0]["step_seconds"])
    row = {"stage": ranks[0]["stage"], "processes": ranks[0]["processes"], "fsdp": ranks[0]["fsdp"],
           "batch_size": ranks[0]["batch_size"], "seconds_per_step": round(seconds, 3),
           "steps_per_second": round(1 / seconds, 3),
           "peak_memory_mib_per_process": [round(r["peak_memory_mib"]) for r in ranks],
           "parameters_per_process": [r["parameters"] for r in ranks],
           "optimizer_elements_per_process": [r.get("optimizer") for r in ranks],
           "full_parameters": ranks[0]["full_parameters"]}
    if ranks[0]["tokens_per_step"]:
        tokens = sum(ranks[0]["tokens_per_step"]) / len(ranks[0]["tokens_per_step"])
        row["tokens_per_second"] = round(tokens / seconds, 1)
        if peak_tflops:
            row["mfu"] = round(6 * parameters * tokens / seconds / (peak_tflops * 1e12), 4)
    else:
        row["episodes_per_second"] = round(ranks[0]["batch_size"] / seconds, 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny", "qwen2-0.5b"))
    parser.add_argument("--stages", default="sft,ppo")
    parser.add_argument("--processes", default="1,2", help="numbers of processes, e.g. 1,2")
    parser.add_argument("--fsdp", default="auto", help="auto (sharded with more than one process), true, false, "
                                                       "or a list: true,false")
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: 8 on the CPU, 64 on a GPU)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the chip's dense bf16 peak, for MFU")
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="sft", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp-setting", default="true", help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="", help=argparse.SUPPRESS)
    parser.add_argument("--reward", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    import platform

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="scaling-"))
    policy, reward = build_models(args.model, tmp)
    from transformers import AutoConfig

    from rlhf.hardware import cpu_info

    parameters = None
    rows = []
    for stage in args.stages.split(","):
        for processes in (int(p) for p in args.processes.split(",")):
            for fsdp in args.fsdp.split(","):
                ranks = launch(args, stage, processes, fsdp, policy, reward, tmp)
                parameters = parameters or ranks[0]["full_parameters"]
                row = summarise(ranks, parameters, args.peak_tflops)
                rows.append(row)
                print(json.dumps(row), flush=True)
    info = {"device": args.device, "model": args.model, "torch": torch.__version__,
            "cpu": cpu_info().model or platform.processor(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "model_parameters": parameters, "model_config": AutoConfig.from_pretrained(policy).to_dict().get(
                "model_type"), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
