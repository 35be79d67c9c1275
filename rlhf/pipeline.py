"""Stages 1 → 2 → 3 (SFT, preference pairs, reward model, PPO) and the held-out evaluation, in one run folder.

`method` picks the road from the preference pairs: `ppo` (reward model, then PPO), `dpo` (DPO on the
pairs directly) or `both` (both roads from the same SFT model and pairs, compared in one table).

Each stage's config and the skipping of finished stages follow `rlhf.wiring` (one precedence rule for every
road): running the pipeline again skips a stage whose marker matches its config; a stage that reruns makes every
later stage rerun too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import config as cfg
from rlhf import distributed, dpo, evaluate, pairs, ppo, reward, sft, wiring
from rlhf.data import resolve_data_path
from rlhf.hardware import Precision
from rlhf.results import format_result
from rlhf.tracking import say

STAGES = {"sft": sft, "pairs": pairs, "reward": reward, "ppo": ppo, "dpo": dpo, "eval": evaluate}
ROADS = {"ppo": ("reward", "ppo"), "dpo": ("dpo",)}
METHODS = {"ppo": ["ppo"], "dpo": ["dpo"], "both": ["ppo", "dpo"]}
NAMES = {"sft": "SFT", "ppo": "PPO", "dpo": "DPO"}


@dataclass
class Config:
    output_dir: str = cfg.field("runs/pipeline", "the run folder: every stage writes below it")
    model: str = cfg.field("default", "the starting model (a causal-LM folder or 'default')")
    data: str = cfg.field("builtin:demonstrations", "demonstrations for SFT")
    prompts: str = cfg.field("builtin:prompts_train", "prompts for the preference pairs and for PPO")
    eval_prompts: str = cfg.field("builtin:prompts_heldout", "held-out prompts for the final evaluation")
    eval_start: bool = cfg.field(False, "also evaluate the starting model as shipped (first row; SFT stays baseline)")
    device: str = cfg.field("auto", "cpu, cuda or auto (every stage)")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false "
                                        "(every stage)")
    seed: int = cfg.field(0, "random seed (every stage)")
    method: str = cfg.field("ppo", "the road from the pairs: ppo (reward model + PPO), dpo, or both")
    sft: dict = cfg.field({}, "settings of the SFT stage (see `rlhf sft --help`)")
    pairs: dict = cfg.field({}, "settings of the pairs stage (see `rlhf pairs --help`)")
    reward: dict = cfg.field({}, "settings of the reward stage (see `rlhf reward --help`)")
    ppo: dict = cfg.field({}, "settings of the PPO stage (see `rlhf ppo --help`)")
    dpo: dict = cfg.field({}, "settings of the DPO stage (see `rlhf dpo --help`)")
    eval: dict = cfg.field({}, "settings of the evaluation (see `rlhf eval --help`)")


def stage_configs(config: Config) -> dict[str, Any]:
    """Each stage's config (only the stages `method` needs): the user's section, with the wiring filled in."""
    if config.method not in METHODS:
        raise cfg.ConfigError(f"pipeline: method must be one of {', '.join(METHODS)}, got '{config.method}'")
    roads = METHODS[config.method]
    run = Path(config.output_dir)
    shared = {"device": config.device, "bf16": config.bf16, "seed": config.seed}
    wiring_of = {
        "sft": {"model": config.model, "data": config.data, "output_dir": str(run / "sft")},
        "pairs": {"model": str(run / "sft"), "data": config.prompts, "output_dir": str(run / "pairs")},
        "reward": {"model": str(run / "sft"), "data": str(run / "pairs" / "pairs.jsonl"),
                   "output_dir": str(run / "reward")},
        "ppo": {"policy": str(run / "sft"), "reward_model": str(run / "reward"), "data": config.prompts,
                "output_dir": str(run / "ppo")},
        "dpo": {"model": str(run / "sft"), "data": str(run / "pairs" / "pairs.jsonl"), "output_dir": str(run / "dpo")},
        "eval": {"models": [config.model] * config.eval_start + [str(run / name) for name in ["sft"] + roads],
                 "baseline": str(run / "sft"), "data": config.eval_prompts,
                 "output_dir": str(run / "eval"), "reward_model": str(run / "reward") if "ppo" in roads else ""},
    }
    wanted = ["sft", "pairs"] + [stage for road in roads for stage in ROADS[road]] + ["eval"]
    return {name: wiring.stage_config(STAGES[name].Config, name, section=getattr(config, name), wiring=wiring_of[name],
                                      shared={k: v for k, v in shared.items() if k != "seed" or name != "eval"})
            for name in wanted}


def main(config: Config) -> dict:
    run = Path(config.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        cfg.save(config, run / "config.yaml")
    configs = stage_configs(config)
    names = {config.model: "as shipped", **{str(run / stage): label for stage, label in NAMES.items()}}
    runners = {name: functools.partial(evaluate.main, names=names) if name == "eval" else STAGES[name].main
               for name in configs}
    results, ran = wiring.run_road({name: (runners[name], c) for name, c in configs.items()}, run / "stages",
                                    resolve=resolve_data_path)
    if not distributed.is_main():  # under torchrun: rank 0 reports
        return results
    if "eval" not in ran:  # nothing ran this time: show the finished run's table again
        say(format_result(results["eval"], names=names))
    say(road_times(results, METHODS[config.method]))
    return results


def road_times(results: dict[str, Any], roads: list[str]) -> str:
    """Wall time of each road from the shared SFT model and pairs (the part where the roads differ)."""
    parts = []
    for road in roads:
        seconds = sum((results.get(stage) or {}).get("seconds", 0.0) for stage in ROADS[road])
        parts.append(f"{NAMES[road]}: {seconds / 60:.1f} min ({' + '.join(ROADS[road])})")
    shared = sum((results.get(stage) or {}).get("seconds", 0.0) for stage in ("sft", "pairs"))
    return f"Wall time of each road after the shared SFT and pairs ({shared / 60:.1f} min): " + "; ".join(parts)
