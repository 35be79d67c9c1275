"""What the side-by-side benchmarks against TRL share: data, the alternating step timer, peak memory, the report.

Each script (`sft_reward_parity.py`, `dpo_parity.py`) describes its stages as `Stage`s and calls `run`:

1. parity: the stage's own check (fp32, tiny random Llama), printed by the stage;
2. speed: each side in its precision (`--precision`: by default ours with `bf16: auto` and TRL in bf16 where the
   CPU computes it natively, else fp32), TRL's own training loop with a callback that, after each TRL step, times one
   step of ours (`next()` on the stage's `training` generator: our real loop, logging included), so the
   two alternate in one process on the same data every step;
3. memory: each side alone in a child process (this script again, `--child STAGE:SIDE`), the child's
   peak RSS (VmHWM) read at its end, so that neither side's high-water mark includes the other.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import _isa  # noqa: E402

ISA = _isa.reexec()  # --isa LEVEL: the caps must be in the environment before torch is imported

import torch  # noqa: E402

from rlhf.data import builtin_task_dir  # noqa: E402
from rlhf.hardware import keep_freed_memory  # noqa: E402
from rlhf.models import build_tiny_model, resolve_model_path  # noqa: E402

BATCH = 8  # examples (SFT) or pairs (reward, DPO) per step, on both sides
COMPILE: bool | None = None  # ours' `compile`: None = its default, else --compile (True) or --eager (False)
OURS_BF16: bool | str = "auto"  # ours' `bf16` in the speed and memory parts (--precision)
TRL_BF16 = True  # TRL's bf16 in the speed and memory parts: --precision, or with auto its best on this CPU
PRECISION = "auto"  # the --precision flag, passed on to the memory children
TARGET = 1.3  # wanted: TRL's s/step / ours ≥ this, with ours' peak memory no higher


def demonstrations(n: int) -> list[dict]:
    """The first n built-in demonstrations, {"prompt": str, "completion": str}."""
    lines = (builtin_task_dir() / "demonstrations.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def demonstration_pairs(n: int) -> list[dict]:
    """n pairs from the built-in demonstrations: its own answer is chosen, the next prompt's answer rejected."""
    rows = demonstrations(n + 1)
    return [{"prompt": rows[i]["prompt"], "chosen": rows[i]["completion"], "rejected": rows[i + 1]["completion"]}
            for i in range(n)]


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def templated_prompt(tokenizer, prompt: str) -> str:
    """The prompt as our stages encode it (chat template + assistant header), as one string for TRL."""
    return tokenizer.apply_chat_template(messages(prompt), add_generation_prompt=True, tokenize=False)


def speed_model(tmp: Path, tiny: bool) -> Path:
    """The model the speed and memory parts train: the embedded SmolLM2-135M-Instruct, or with --tiny a tiny Llama."""
    return build_tiny_model(tmp / "tiny_speed", seed=0) if tiny else resolve_model_path("default")


def ours_settings(bf16: bool | None = None) -> dict:
    """Our stage's precision and compile settings: the speed part's (--precision, --compile / --eager, else our
    defaults), or with `bf16` given (the parity part) that precision, eager. No periodic training-state saves: the
    peers save nothing while they are timed."""
    if bf16 is not None:
        return {"bf16": bf16, "compile": False, "save_every": 0}
    return {"bf16": OURS_BF16, "save_every": 0, **({} if COMPILE is None else {"compile": COMPILE})}


def trl_bf16(bf16: bool | None = None) -> bool:
    return TRL_BF16 if bf16 is None else bf16


def trl_args(config_class, out: Path, bf16: bool, max_steps: int = -1, **stage_args):
    """TRL's config with the settings every stage shares: our batch, CPU, no gradient checkpointing, no saving."""
    return config_class(output_dir=str(out), per_device_train_batch_size=BATCH, bf16=bf16, use_cpu=True,
                        gradient_checkpointing=False, max_steps=max_steps, lr_scheduler_type="constant",
                        logging_steps=10_000, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                        **stage_args)


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def first_batch_losses(start_ours: Callable[[], Generator[dict, None, dict]], make_trainer: Callable[[], object]):
    """→ (our loss on our first batch, computed before the update; TRL's `compute_loss` on its first collated
    batch, no grad; TRL's trainer, for the token-id check). Ours runs first, then TRL's trainer is built."""
    run = start_ours()
    ours = float(next(run)["loss"])
    run.close()
    trainer = make_trainer()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, first_batch(trainer)).item()
    return ours, theirs, trainer


@dataclass
class Stage:
    """One stage compared with TRL.

    parity(tmp) → bool: prints and checks the first-batch loss against TRL's.
    ours(model_dir, tmp, steps) → our `training` generator set up to run at least `steps` steps on BATCH
    examples (the same ones every step), bf16.
    trl(model_dir, tmp, max_steps, callbacks) → TRL's trainer on the same examples, bf16.
    same_ids(trainer, model_dir) → whether TRL tokenised exactly the ids our stage trains on.
    """

    name: str
    parity: Callable[[Path], bool]
    ours: Callable[[Path, Path, int], Generator[dict, None, dict]]
    trl: Callable[..., object]
    same_ids: Callable[[object, Path], bool]
    results: dict = field(default_factory=dict)


def report_parity(name: str, ours_label: str, trl_label: str, setting: str, identical: bool, ours: float,
                  theirs: float) -> bool:
    diff = abs(ours - theirs)
    ok = identical and diff < 1e-4
    width = max(len(ours_label), len(trl_label))
    print(f"\n== {name} parity: {setting}, fp32 ==")
    print(f"token ids identical on both sides: {identical}")
    print(f"ours  ({ours_label}):{' ' * (width - len(ours_label))} {ours:.7f}")
    print(f"TRL   ({trl_label}):{' ' * (width - len(trl_label))} {theirs:.7f}")
    print(f"abs diff {diff:.2e}  ->  {'PASS' if ok else 'FAIL'} (tolerance 1e-4)")
    return ok


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def speed(stage: Stage, tmp: Path, steps: int, tiny: bool) -> dict:
    """TRL's loop with ours stepped after each of its steps; → medians after the first (warm-up) step."""
    from transformers import TrainerCallback

    model_dir = speed_model(tmp, tiny)
    ours = stage.ours(model_dir, tmp / f"ours_{stage.name}", steps + 2)
    started = time.perf_counter()
    primed = next(ours)  # set-up (model, data) and one step, untimed
    print(f"ours set up and stepped once in {time.perf_counter() - started:.1f} s", flush=True)
    times: dict[str, list[float]] = {"ours": [], "trl": []}
    our_tokens: list[int] = [primed["batch_tokens"]]

    class Alternate(TrainerCallback):
        """Times TRL's step (forward, backward, clip, optimiser, scheduler), then runs and times one of ours."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["trl"].append(time.perf_counter() - self.started)
            began = time.perf_counter()
            step = next(ours)
            times["ours"].append(time.perf_counter() - began)
            our_tokens.append(step["batch_tokens"])
            print(f"  step {len(times['trl'])}: TRL {times['trl'][-1]:.2f} s, ours {times['ours'][-1]:.2f} s",
                  flush=True)

    trainer = stage.trl(model_dir, tmp / f"trl_{stage.name}", max_steps=steps + 1, callbacks=[Alternate()])
    batch = first_batch(trainer)
    trl_tokens = int(batch["attention_mask"].sum())
    identical = stage.same_ids(trainer, model_dir)
    label = "tiny random Llama" if tiny else f"SmolLM2-135M-Instruct ({model_dir})"
    precision = f"ours bf16: {OURS_BF16}, TRL {'bf16' if TRL_BF16 else 'fp32'}"
    print(f"\n== {stage.name} speed: {label}, {precision}, batch {BATCH}, {torch.get_num_threads()} threads ==")
    print(f"token ids identical: {identical}; real tokens per step: ours {our_tokens[0]}, TRL {trl_tokens}; "
          f"TRL batch {tuple(batch['input_ids'].shape)}")
    trainer.train()
    ours.close()
    if len(set(our_tokens)) != 1:
        print(f"WARNING: our batches differ in size: {our_tokens}")
    ours_s, trl_s = statistics.median(times["ours"][1:]), statistics.median(times["trl"][1:])
    result = {"ours_s": ours_s, "trl_s": trl_s, "ours_tok_s": our_tokens[0] / ours_s, "trl_tok_s": trl_tokens / trl_s,
              "speedup": trl_s / ours_s, "same_ids": identical and our_tokens[0] == trl_tokens}
    print(f"median over {steps} steps after 1 warm-up:")
    print(f"  {'':5} {'s/step':>8} {'tokens/s':>9}")
    print(f"  {'TRL':5} {trl_s:8.2f} {result['trl_tok_s']:9.1f}")
    print(f"  {'ours':5} {ours_s:8.2f} {result['ours_tok_s']:9.1f}")
    print(f"  ours/TRL s/step {ours_s / trl_s:.2f}; throughput ours/TRL = TRL_s/ours_s {result['speedup']:.2f}x  ->  "
          f"{'meets' if result['speedup'] >= TARGET else 'BELOW'} the {TARGET}x target")
    return result


def child(stage: Stage, side: str, steps: int, tiny: bool) -> None:
    """Runs `steps` steps of one side alone, then prints its peak RSS (the parent reads the last line)."""
    # a TensorBoard writer's thread may still be flushing into the folder as it is removed: not this run's concern
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        model_dir = speed_model(tmp, tiny)
        if side == "ours":
            keep_freed_memory()  # what every `rlhf` stage command does first: ours as its users run it
            ours = stage.ours(model_dir, tmp / "ours", steps)
            for _ in range(steps):
                next(ours)
            ours.close()  # the stage's own clean-up (its log closed) before the folder goes
        else:
            stage.trl(model_dir, tmp / "trl", max_steps=steps).train()
        print(f"PEAK_RSS_MIB {peak_rss_mib():.1f}", flush=True)


def memory(stage: Stage, steps: int, tiny: bool) -> dict:
    """Peak RSS of each side alone, each in its own child process running `steps` steps."""
    peaks = {}
    for side in ("ours", "trl"):
        command = [sys.executable, sys.argv[0], "--child", f"{stage.name}:{side}", "--steps", str(steps),
                   "--isa", ISA, "--precision", PRECISION] + {True: ["--compile"], False: ["--eager"]}.get(COMPILE, [])
        done = subprocess.run(command + (["--tiny"] if tiny else []), capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_MIB ")]
        if done.returncode != 0 or not lines:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
            raise RuntimeError(f"memory child {stage.name}:{side} failed (exit {done.returncode})")
        peaks[side] = float(lines[-1].split()[1])
    ratio = peaks["ours"] / peaks["trl"]
    print(f"\n== {stage.name} memory: each side alone in a child process, {steps} steps, peak RSS (VmHWM) ==")
    print(f"  ours {peaks['ours']:.0f} MiB, TRL {peaks['trl']:.0f} MiB, ours/TRL {ratio:.2f}  ->  "
          f"{'not higher' if ratio <= 1 else 'HIGHER'}")
    return {"ours_mib": peaks["ours"], "trl_mib": peaks["trl"], "memory_ratio": ratio}


def summary(stages: list[Stage]) -> None:
    rows = [s for s in stages if s.results]
    if not rows:
        return
    print("\n== summary ==")
    print(f"{'stage':7} {'parity':7} {'ours s':>7} {'TRL s':>7} {'ours tok/s':>10} {'TRL tok/s':>10} {'speedup':>8} "
          f"{'ours MiB':>9} {'TRL MiB':>8} {'mem':>5}")
    for s in rows:
        r = s.results

        def cell(key: str, width: int, fmt: str, unit: str = "", r: dict = r) -> str:
            return (format(r[key], fmt) + unit if key in r else "-").rjust(width)

        parity = {True: "PASS", False: "FAIL"}.get(r.get("parity"), "-")
        print(f"{s.name:7} {parity:7} {cell('ours_s', 7, '.2f')} {cell('trl_s', 7, '.2f')} "
              f"{cell('ours_tok_s', 10, '.1f')} {cell('trl_tok_s', 10, '.1f')} {cell('speedup', 8, '.2f', 'x')} "
              f"{cell('ours_mib', 9, '.0f')} {cell('trl_mib', 8, '.0f')} {cell('memory_ratio', 5, '.2f')}")


def run(description: str, stages: list[Stage]) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each side after one warm-up step")
    parser.add_argument("--tiny", action="store_true", help="speed and memory on a tiny random Llama (a smoke test)")
    parser.add_argument("--only", choices=[s.name for s in stages], action="append",
                        help="only this stage (repeatable)")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--compile", action="store_true", help="ours with `compile: true` (TRL as it runs)")
    parser.add_argument("--eager", action="store_true", help="ours with `compile: false`")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="auto: ours with `bf16: auto`, TRL in bf16 where this CPU computes it natively, else "
                             "fp32 (its best here); bf16 or fp32: both sides so")
    parser.add_argument("--isa", default="native", choices=list(_isa.LEVELS),
                        help="cap the instruction set torch and oneDNN use (see bench/_isa.py)")
    parser.add_argument("--json", default="", help="write the results (and the machine) here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # STAGE:SIDE, run by the memory part
    args = parser.parse_args()
    global COMPILE, OURS_BF16, TRL_BF16, PRECISION
    COMPILE = True if args.compile else False if args.eager else None
    PRECISION = args.precision
    from rlhf.hardware import cpu_info

    OURS_BF16 = {"auto": "auto", "bf16": True, "fp32": False}[args.precision]
    TRL_BF16 = cpu_info().native_bf16 if args.precision == "auto" else args.precision == "bf16"
    by_name = {s.name: s for s in stages}
    if args.child:
        name, side = args.child.split(":")
        child(by_name[name], side, args.steps, args.tiny)
        return 0
    import transformers
    import trl

    machine = _isa.machine()
    print(f"machine: {_isa.describe(machine)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{torch.get_num_threads()} threads; ours compile {COMPILE if COMPILE is not None else 'default'}, "
          f"bf16 {OURS_BF16}; TRL bf16 {TRL_BF16}")
    chosen = [by_name[n] for n in args.only] if args.only else stages
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for stage in chosen:
            folder = Path(tmp) / stage.name
            folder.mkdir()
            if not args.skip_parity:
                stage.results["parity"] = stage.parity(folder)
                ok &= stage.results["parity"]
            if not args.skip_speed:
                stage.results.update(speed(stage, folder, args.steps, args.tiny))
                ok &= stage.results["same_ids"]
            if not args.skip_memory:
                stage.results.update(memory(stage, args.steps + 1, args.tiny))
    summary(chosen)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "ours_compile": COMPILE, "ours_bf16": OURS_BF16,
                                               "trl_bf16": TRL_BF16, "stages": {s.name: s.results for s in chosen}},
                                              indent=2))
    return 0 if ok else 1
