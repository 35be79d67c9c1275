"""`rlhf ppo` against TRL 1.12's PPOTrainer (the last TRL with PPO), side by side in one process.

A script, not a test: TRL 1.12 lives in its own environment (`make bench-env`, see bench/README.md).

    .venv-trl112/bin/python bench/ppo_vs_trl.py                   # like-for-like, fp32 and bf16, 10 timed steps each
    .venv-trl112/bin/python bench/ppo_vs_trl.py --tiny --steps 2  # smoke test of every code path (seconds)
    python bench/ppo_vs_trl.py --device cuda --model qwen2-0.5b --generation --bandwidth_gbs 3350 --peak_tflops 989
                                                                 # on a GPU (see "On a GPU" below)

Like-for-like (the issue's setting): the embedded SmolLM2-135M-Instruct as policy and (a second copy)
reference, a reward model and a separate critic both loaded from the same sequence-classifier folder (four
models on both sides; ours with `critic: model`), batch 8, responses of at most 48 tokens at temperature 0.7,
one PPO epoch over one mini-batch, the same learning rate for policy and critic, k1 KL with β = 0.05, missing-EOS
penalty 1, raw (unnormalised) reward-model scores, the same precision on both sides. TRL gets `<|endoftext|>` as
its pad token: TRL 1.12 treats every pad id inside a sequence as padding, and SmolLM2's own pad is `<|im_end|>`, the
turn end. TRL's PPOTrainer runs its own loop; a callback at each `on_step_end` times the TRL iteration that just
ended and then runs one iteration of ours (`rlhf.ppo.training`, the generator `rlhf ppo` itself runs), so the two
alternate. The first iteration of each is warm-up (ours includes loading its models) and is not counted.

Precision: TRL 1.12's PPOTrainer makes its own `Accelerator` with no mixed precision, so `bf16=True` in its config
changes nothing on CPU: every forward pass, generation included, runs in fp32. Two like-for-like settings follow
from that (`--settings`): `fp32`, ours in fp32 against TRL as it runs; and `bf16`, both under bf16 autocast, TRL's
put on by this harness (see `trl_trainer`). `defaults` (or `--defaults`) pairs ours as recommended (bf16, the value
head on the policy: 3 models) with TRL in fp32, its only precision on CPU (it runs with `bf16=False` here; with
`bf16=True` its forward passes stay fp32 all the same, checked with hooks). Per ISA level (`--isa`): `auto`, the
four models on both sides with ours' default precision and TRL's best; `auto_head`, ours in all its defaults (the
value head too) against TRL as `auto` runs it.

Reported per side: seconds per PPO iteration (median), episodes/s, response tokens/s, the share of the
iteration spent generating, peak resident memory (each side alone in a child process), and the KL / score
trajectories of the timed run. `--generation` compares the
tokens/s of our sampler with transformers' `generate` on one batch, for a frozen and a trainable model.

On a GPU (`--device cuda`): peak memory is `torch.cuda.max_memory_allocated` of each side alone; `--model
qwen2-0.5b` builds a model of Qwen2-0.5B's shape with random weights (nothing can be downloaded; the
vocabulary is the embedded tokenizer's 49,152 tokens instead of Qwen2's 151,936); `--bandwidth_gbs` prints
generation tokens/s against the memory-bandwidth bound (every bf16 weight read once per decode step) and
`--peak_tflops` our training MFU (6 · parameters · trained tokens per second, policy and critic).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _isa  # noqa: E402

ISA = _isa.reexec()  # --isa LEVEL: the caps must be in the environment before torch is imported

import torch  # noqa: E402

from rlhf import ppo  # noqa: E402
from rlhf.data import encode_prompt, read_prompts, resolve_data_path, write_jsonl  # noqa: E402
from rlhf.hardware import keep_freed_memory  # noqa: E402
from rlhf.models import build_tiny_model, load_tokenizer, resolve_model_path  # noqa: E402

BATCH = 8
MODEL = "smollm2"  # smollm2 | tiny | qwen2-0.5b (set from the command line)
DEVICE = "cpu"
RESPONSE_TOKENS = 48
TEMPERATURE = 0.7
BETA = 0.05
LR = 3e-6  # TRL 1.12 PPOConfig's default learning rate
EOS_PENALTY = 1.0
COMPILE: bool | None = None  # ours' `compile`: None = its default; --compile (True) or --eager (False)
SIDE_BY_SIDE = True  # ours with `side_by_side: true`, its default (--in-turn sets false: the ablation)
COMPILE_DECODE = True  # ours with `compile_decode: true`, its default (--eager-decode: the ablation)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_qwen2_shaped(out: Path) -> Path:
    """A model of Qwen2-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864, tied embeddings)
    with seeded random weights and the embedded tokenizer (so its vocabulary: 49,152)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    tokenizer = load_tokenizer(resolve_model_path("default"))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_models(tmp: Path) -> tuple[Path, Path]:
    """(policy folder, reward-model folder): the reward model is the policy's backbone with a seeded score head,
    saved once so that both tools load the very same weights."""
    from transformers import AutoModelForSequenceClassification

    builders = {"tiny": lambda: build_tiny_model(tmp / "tiny_policy", seed=0),
                "qwen2-0.5b": lambda: build_qwen2_shaped(tmp / "qwen2_shaped")}
    policy_dir = builders.get(MODEL, lambda: resolve_model_path("default"))()
    reward_dir = tmp / "reward"
    if not (reward_dir / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
        tokenizer = load_tokenizer(policy_dir)
        model.config.pad_token_id = peer_pad_id(tokenizer)
        model.save_pretrained(reward_dir)
        tokenizer.save_pretrained(reward_dir)
    return Path(policy_dir), reward_dir


def peer_pad_id(tokenizer) -> int:
    """`<|endoftext|>` where the vocabulary has it (SmolLM2), else a special token that is not EOS."""
    token = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(token, int) and token != tokenizer.unk_token_id and token != tokenizer.eos_token_id:
        return token
    from rlhf.models import reward_pad_id

    return reward_pad_id(tokenizer)


def bench_prompts(count: int) -> list:
    return read_prompts(resolve_data_path("builtin:prompts_train"))[:count]


# name → (critic of ours, ours' `bf16`, TRL's models under bf16 autocast put on by this harness ("native": where the
# CPU computes bf16 natively, TRL's best precision there), title)
SETTINGS = {
    "auto": ("model", "auto", "native", "like-for-like, ours in its default settings (`bf16: auto`, compile as by "
                                        "default); TRL in its best precision on this CPU (bf16 where native, "
                                        "else fp32)"),
    "fp32": ("model", False, False, "like-for-like, fp32: four models, batch 8, 48-token responses, 1 PPO epoch; "
                                    "both sides fp32"),
    "bf16": ("model", True, True, "like-for-like, bf16 autocast: as above, both sides under bf16 autocast "
                                  "(TRL's put on by the harness)"),
    "defaults": ("head", True, False, "defaults: ours bf16 with the value head on the policy (3 models); TRL 1.12 in "
                                      "fp32, the only precision its PPOTrainer applies on CPU"),
    "auto_head": ("head", "auto", "native", "ours in all its default settings, the critic included (the value head on "
                                            "the policy: 3 models, `bf16: auto`); TRL in its best precision on this "
                                            "CPU, with its separate critic (4 models: the only set-up it has)"),
}


def setting_of(name: str) -> tuple:
    """SETTINGS[name] with "native" resolved: TRL under bf16 autocast where this CPU computes bf16 natively."""
    critic, ours_bf16, trl_autocast, title = SETTINGS[name]
    if trl_autocast == "native":
        from rlhf.hardware import cpu_info

        trl_autocast = DEVICE == "cuda" or cpu_info().native_bf16
    return critic, ours_bf16, trl_autocast, title


def in_autocast(function):
    """`function` run inside a bf16 autocast region (on DEVICE)."""
    def wrapped(*args, **kwargs):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return function(*args, **kwargs)
    return wrapped


def trl_trainer(policy_dir: Path, reward_dir: Path, prompts: list, out: Path, steps: int, callbacks=(),
                autocast: bool = False):
    """TRL 1.12's PPOTrainer with the like-for-like settings. TRL 1.12 builds its own `Accelerator` without a mixed
    precision (ppo_trainer.py: `Accelerator(gradient_accumulation_steps=...)`), so its `bf16=True` is not applied:
    every forward pass runs in fp32 (checked with forward hooks). With `autocast` this harness puts bf16 autocast on
    each of TRL's forward passes, as accelerate does for a prepared model: the policy's and both sequence
    classifiers' backbones (TRL calls the backbones directly), and one region around each `batch_generation` call
    (in `TimedGeneration`), so that generation casts the weights once per call, as ours does."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = load_tokenizer(policy_dir)
    tokenizer.pad_token_id = peer_pad_id(tokenizer)
    tokenizer.padding_side = "left"
    data = Dataset.from_list([{"input_ids": encode_prompt(tokenizer, p)} for p in prompts])
    args = PPOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     num_mini_batches=1, num_ppo_epochs=1, response_length=RESPONSE_TOKENS, temperature=TEMPERATURE,
                     total_episodes=BATCH * steps, local_rollout_forward_batch_size=BATCH, learning_rate=LR,
                     kl_coef=BETA, kl_estimator="k1", missing_eos_penalty=EOS_PENALTY, stop_token="eos",
                     bf16=autocast, use_cpu=DEVICE == "cpu", num_sample_generations=0, save_strategy="no",
                     report_to="none", logging_steps=1, seed=0, disable_tqdm=True, gradient_checkpointing=False)
    load = lambda cls, path: cls.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    classifier = lambda: AutoModelForSequenceClassification.from_pretrained(  # noqa: E731
        reward_dir, num_labels=1, dtype=torch.float32)
    policy, reference = load(AutoModelForCausalLM, policy_dir), load(AutoModelForCausalLM, policy_dir)
    reward, value = classifier(), classifier()
    if autocast:
        for model in (policy, reference):
            model.forward = in_autocast(model.forward)
        for model in (reward, value):
            backbone = getattr(model, model.base_model_prefix)
            backbone.forward = in_autocast(backbone.forward)
    return PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward,
                      value_model=value, train_dataset=data, callbacks=list(callbacks))


def our_config(policy_dir: Path, reward_dir: Path, prompts_file: Path, out: Path, steps: int, critic: str,
               bf16: bool) -> ppo.Config:
    return ppo.Config(policy=str(policy_dir), reward_model=str(reward_dir), data=str(prompts_file), output_dir=str(out),
                      steps=steps, batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=1,
                      max_new_tokens=RESPONSE_TOKENS, temperature=TEMPERATURE, lr=LR,
                      value_lr=1e-3, critic_lr=LR, critic=critic, save_every=0,
                      beta=BETA, kl_estimator="k1", normalize_reward=False, missing_eos_penalty=EOS_PENALTY, gold=False,
                      monitor_every=0, sample_every=10_000, generation_batch_size=BATCH, bf16=bf16,
                      **({} if COMPILE is None else {"compile": COMPILE}),
                      **({} if COMPILE_DECODE else {"compile_decode": False}), side_by_side=SIDE_BY_SIDE, device=DEVICE,
                      seed=0)


class TimedGeneration:
    """Wraps TRL's `batch_generation` to measure how long each TRL iteration spends generating."""

    def __init__(self, autocast: bool):
        import trl.experimental.ppo.ppo_trainer as module

        self.module, self.original, self.seconds = module, module.batch_generation, 0.0
        if getattr(self.original, "timed_original", None):  # a second setting in the same process
            self.original = self.original.timed_original
        original = in_autocast(self.original) if autocast else self.original

        def timed(*args, **kwargs):
            synchronize()  # on a GPU the kernels queued before and inside count where they belong
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize()
                self.seconds += time.perf_counter() - began

        timed.timed_original = self.original
        module.batch_generation = timed

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def alternate(policy_dir: Path, reward_dir: Path, tmp: Path, steps: int, setting: str) -> dict:
    """TRL's loop with one iteration of ours after each of TRL's; per-iteration times and metrics of both."""
    from transformers import TrainerCallback

    prompts = bench_prompts(BATCH * (steps + 1) * 2)
    prompts_file = write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in prompts])
    critic, ours_bf16, trl_autocast, _ = setting_of(setting)
    ours_steps = ppo.training(our_config(policy_dir, reward_dir, prompts_file, tmp / f"ours_{setting}", steps, critic,
                                         ours_bf16))
    generation = TimedGeneration(trl_autocast)
    record = {"trl": [], "ours": []}

    class Alternate(TrainerCallback):
        mark = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            generation.take()
            synchronize()
            self.mark = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/kl" in logs:
                self.logs = logs

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()  # each side's queued GPU work is counted in its own iteration, not the other's
            trl_seconds = time.perf_counter() - self.mark
            logs = getattr(self, "logs", {})
            record["trl"].append({"seconds": trl_seconds, "generation_seconds": generation.take(),
                                  "kl": logs.get("objective/kl"), "score": logs.get("objective/scores"),
                                  "response_tokens": None})
            began = time.perf_counter()
            row = next(ours_steps)
            synchronize()
            record["ours"].append({"seconds": time.perf_counter() - began,
                                   "generation_seconds": row["generation_seconds"],
                                   "kl": row["kl"], "score": row["score"],
                                   "response_tokens": row["response_length"] * BATCH})
            self.mark = time.perf_counter()

    trainer = trl_trainer(policy_dir, reward_dir, prompts, tmp / f"trl_{setting}", steps, callbacks=[Alternate()],
                          autocast=trl_autocast)
    trainer.train()
    return record


def summarise(record: dict) -> dict:
    out = {}
    for side, rows in record.items():
        timed = rows[1:]  # the first iteration is warm-up
        seconds = statistics.median(r["seconds"] for r in timed)
        generation = statistics.median(r["generation_seconds"] / r["seconds"] for r in timed)
        tokens = [r["response_tokens"] for r in timed if r["response_tokens"] is not None]
        out[side] = {"s_per_iteration": seconds, "episodes_per_s": BATCH / seconds, "generation_share": generation,
                     "response_tokens_per_s": (statistics.median(t / r["seconds"] for t, r in zip(tokens, timed))
                                               if tokens else None),
                     "kl": [r["kl"] for r in rows], "score": [r["score"] for r in rows],
                     "seconds": [round(r["seconds"], 2) for r in rows]}
    return out


def peak_memory_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else peak_rss_mib()


def child_peak_memory(side: str, tmp: Path, setting: str) -> float:
    """Peak memory of one side alone (3 iterations), in its own process: RSS on CPU, allocated memory on a GPU."""
    command = [sys.executable, __file__, "--memory-child", side, "--setting", setting, "--workdir", str(tmp),
               "--model", MODEL, "--device", DEVICE, "--isa", ISA] \
        + {True: ["--compile"], False: ["--eager"]}.get(COMPILE, []) \
        + ([] if SIDE_BY_SIDE else ["--in-turn"]) + ([] if COMPILE_DECODE else ["--eager-decode"])
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in result.stdout.splitlines():
        if line.startswith("PEAK_RSS_MIB "):
            return float(line.split()[1])
    raise RuntimeError(f"memory child '{side}' failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def memory_child(side: str, tmp: Path, setting: str) -> None:
    policy_dir, reward_dir = build_models(tmp)
    prompts = bench_prompts(BATCH * 4)
    steps = 3
    critic, ours_bf16, trl_autocast, _ = setting_of(setting)
    if side == "trl":
        generation = TimedGeneration(trl_autocast)  # noqa: F841 (it wraps TRL's generation in autocast when asked)
        trl_trainer(policy_dir, reward_dir, prompts, tmp / "mem_trl", steps, autocast=trl_autocast).train()
    else:
        keep_freed_memory()  # what every `rlhf` stage command does first: ours as its users run it
        prompts_file = write_jsonl(tmp / "mem_prompts.jsonl", [{"prompt": p} for p in prompts])
        run = ppo.training(our_config(policy_dir, reward_dir, prompts_file, tmp / "mem_ours", steps, critic, ours_bf16))
        for _ in range(steps):
            next(run)
    print(f"PEAK_RSS_MIB {peak_memory_mib():.1f}", flush=True)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def generation_check(policy_dir: Path, repeats: int = 3) -> dict:
    """Tokens/s of our sampler (`rlhf.rollout.sample`) and of transformers' `generate` under bf16 autocast, on the
    same batch of 8 prompts, 48 new tokens forced (min_new_tokens), the same sampling settings; median of `repeats`
    after one warm-up (which compiles ours' decode step under --compile). Two models: a frozen one (as `rlhf pairs`
    and `rlhf eval` load it) and a trainable one (as PPO's policy, and TRL's, is)."""
    from rlhf.data import pad_left
    from rlhf.hardware import autocast
    from rlhf.models import load_causal_lm
    from rlhf.rollout import sample

    tokenizer = load_tokenizer(policy_dir)
    prompts = bench_prompts(BATCH)
    ids, mask = pad_left([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    result = {}
    for kind in ("frozen", "trainable"):
        model = load_causal_lm(policy_dir, torch.device(DEVICE), trainable=kind == "trainable")

        def hf(model=model):
            with torch.no_grad(), autocast(torch.device(DEVICE), True):
                out = model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE),
                                     max_new_tokens=RESPONSE_TOKENS, do_sample=True,
                                     temperature=TEMPERATURE, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, min_new_tokens=RESPONSE_TOKENS)
            return (out.shape[1] - ids.shape[1]) * BATCH

        def ours(model=model):
            rollout = sample(model, tokenizer, prompts, RESPONSE_TOKENS, TEMPERATURE, batch_size=BATCH, bf16=True,
                             min_new_tokens=RESPONSE_TOKENS, compiled=bool(COMPILE) and COMPILE_DECODE)  # as PPO does
            return rollout.response_ids.shape[1] * BATCH

        for name, run in (("transformers_generate", hf), ("ours", ours)):
            rates = []
            for repeat in range(repeats + 1):
                torch.manual_seed(repeat)
                synchronize()
                began = time.perf_counter()
                tokens = run()
                synchronize()
                if repeat:  # the first is warm-up
                    rates.append(tokens / (time.perf_counter() - began))
            result[f"{kind}_{name}_tok_per_s"] = statistics.median(rates)
        result[f"{kind}_ratio"] = result[f"{kind}_ours_tok_per_s"] / result[f"{kind}_transformers_generate_tok_per_s"]
    return result


def parameter_count(policy_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_dir))
    return sum(p.numel() for p in model.parameters())


def bandwidth_bound(policy_dir: Path, bandwidth_gbs: float) -> float:
    """Tokens/s if every decode step read each bf16 weight once and nothing else (KV cache ignored)."""
    return BATCH * bandwidth_gbs * 1e9 / (2 * parameter_count(policy_dir))


def training_mfu(ours: dict, policy_dir: Path, peak_tflops: float) -> float:
    """6 · N · tokens for the policy and for the critic (same size) per iteration, over the iteration's time
    outside generation; tokens = the batch's prompt + response positions (the rollout's padded width)."""
    prompts = bench_prompts(BATCH)
    tokenizer = load_tokenizer(policy_dir)
    width = max(len(encode_prompt(tokenizer, p)) for p in prompts) + RESPONSE_TOKENS
    seconds = ours["s_per_iteration"] * (1 - ours["generation_share"])
    return 2 * 6 * parameter_count(policy_dir) * BATCH * width / seconds / (peak_tflops * 1e12)


def print_table(title: str, summary: dict) -> None:
    ours, trl = summary["ours"], summary["trl"]
    print(f"\n== {title} ==")
    print(f"{'':34s}{'ours':>12s}{'TRL 1.12':>12s}")
    print(f"{'s / PPO iteration (median)':34s}{ours['s_per_iteration']:12.2f}{trl['s_per_iteration']:12.2f}")
    print(f"{'episodes / s':34s}{ours['episodes_per_s']:12.3f}{trl['episodes_per_s']:12.3f}")
    print(f"{'generation share of the iteration':34s}{ours['generation_share']:12.0%}{trl['generation_share']:12.0%}")
    if ours["response_tokens_per_s"]:
        print(f"{'response tokens / s (ours)':34s}{ours['response_tokens_per_s']:12.1f}")
    if "peak_rss_mib" in ours:
        label = "peak GPU memory, alone (MiB)" if DEVICE == "cuda" else "peak RSS, alone (MiB)"
        print(f"{label:34s}{ours['peak_rss_mib']:12.0f}{trl['peak_rss_mib']:12.0f}")
    print(f"throughput ours / TRL = {trl['s_per_iteration'] / ours['s_per_iteration']:.2f}x")
    print("per-iteration seconds  ours:", ours["seconds"], " TRL:", trl["seconds"])
    for key in ("kl", "score"):
        print(f"{key:6s} ours: {[round(v, 3) for v in ours[key]]}")
        print(f"{key:6s} TRL : {[round(v, 3) if v is not None else None for v in trl[key]]}")
    kl_o, kl_t = statistics.mean(ours["kl"]), statistics.mean(v for v in trl["kl"] if v is not None)
    sc_o, sc_t = statistics.mean(ours["score"]), statistics.mean(v for v in trl["score"] if v is not None)
    print(f"mean over the run: KL ours {kl_o:.3f} vs TRL {kl_t:.3f}; score ours {sc_o:.3f} vs TRL {sc_t:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed PPO iterations per side (plus one warm-up)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (smoke test)")
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny", "qwen2-0.5b"),
                        help="smollm2 (the embedded model), tiny, or qwen2-0.5b (its shape, random weights)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bandwidth_gbs", type=float, default=0.0, help="memory bandwidth, for the generation bound")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the chip's dense bf16 peak, for MFU")
    parser.add_argument("--settings", default="fp32,bf16",
                        help=f"comma-separated, run in this order, from: {', '.join(SETTINGS)} (default: fp32,bf16)")
    parser.add_argument("--defaults", action="store_true", help="also run the 'defaults' setting")
    parser.add_argument("--generation", action="store_true", help="also compare generation tokens/s")
    parser.add_argument("--compile", action="store_true", help="ours with `compile: true` (TRL 1.12's PPOTrainer has "
                                                               "no compile path: its accelerator has no dynamo plugin)")
    parser.add_argument("--eager", action="store_true", help="ours with `compile: false`")
    parser.add_argument("--isa", default="native", choices=list(_isa.LEVELS),
                        help="cap the instruction set torch and oneDNN use (see bench/_isa.py)")
    parser.add_argument("--eager-decode", action="store_true",
                        help="with --compile, ours with `compile_decode: false`: sampling's decode steps eager "
                             "(the ablation)")
    parser.add_argument("--in-turn", action="store_true", help="ours with `side_by_side: false`: the policy's and the "
                                                               "critic's backward passes in turn (the ablation)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--setting", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL, DEVICE, COMPILE, SIDE_BY_SIDE, COMPILE_DECODE
    MODEL, DEVICE = ("tiny" if args.tiny else args.model), args.device
    COMPILE = True if args.compile else False if args.eager else None
    SIDE_BY_SIDE = not args.in_turn
    COMPILE_DECODE = not args.eager_decode
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(os.cpu_count() or 1)

    if args.memory_child:
        memory_child(args.memory_child, Path(args.workdir), args.setting)
        return

    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{os.cpu_count()} CPU threads")
    results = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "trl": trl.__version__},
               "ours_compile": COMPILE, "ours_side_by_side": SIDE_BY_SIDE, "ours_compile_decode": COMPILE_DECODE,
               "machine": _isa.machine()}
    print(f"machine: {_isa.describe(results['machine'])}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        policy_dir, reward_dir = build_models(tmp)
        settings = [name for name in args.settings.split(",") if name]
        if args.defaults and "defaults" not in settings:
            settings.append("defaults")
        unknown = [name for name in settings if name not in SETTINGS]
        if unknown:
            parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
        for setting in settings:
            title = setting_of(setting)[3]
            summary = summarise(alternate(policy_dir, reward_dir, tmp, args.steps + 1, setting))
            summary["trl_bf16"] = setting_of(setting)[2]
            if not args.skip_memory:
                for side in ("ours", "trl"):
                    summary[side]["peak_rss_mib"] = child_peak_memory(side, tmp, setting)
            if args.peak_tflops:
                summary["ours"]["training_mfu"] = training_mfu(summary["ours"], policy_dir, args.peak_tflops)
                print(f"our training MFU (policy and critic, 6·N·tokens over the non-generation time): "
                      f"{summary['ours']['training_mfu']:.1%}")
            print_table(title, summary)
            results[setting] = summary
        if args.generation:
            gen = generation_check(policy_dir)
            if args.bandwidth_gbs:
                gen["bandwidth_bound_tok_per_s"] = bandwidth_bound(policy_dir, args.bandwidth_gbs)
                gen["ours_share_of_bound"] = gen["trainable_ours_tok_per_s"] / gen["bandwidth_bound_tok_per_s"]
            print("\n== generation, batch 8, 48 new tokens, bf16 ==")
            for key, value in gen.items():
                print(f"{key:40s}{value:10.2f}")
            results["generation"] = gen
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
