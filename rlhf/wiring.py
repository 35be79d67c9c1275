"""Stages run from one run's settings: the one place where a stage's config is put together, and where a stage
that already finished is skipped. `rlhf pipeline`, `rlhf constitutional` and `rlhf study` all go through it.

One precedence rule, lowest first:
  1. the stage's own defaults (its Config dataclass);
  2. the road's defaults for that stage (e.g. Constitutional AI's PPO without the gold judge);
  3. the run-wide settings (device, bf16, seed; a study's shared PPO settings);
  4. the stage's section of the file (`ppo: {lr: 1e-5}`, or `--ppo.lr 1e-5` on the command line);
  5. the wiring: the paths that connect the stages (models, data, output folders), which a section may not set.

A stage has finished when its marker (`<run>/stages/<name>.json`, written after it returned) holds the same
resolved config and the same fingerprints of its inputs (every file or folder its config names: data, models,
upstream checkpoints), and its output folder is still there; otherwise it reruns, saying why, and a stage that runs
makes every later stage of the same road run too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rlhf import config as cfg
from rlhf import distributed
from rlhf.tracking import say


def stage_config(cls: type, name: str, *, section: dict[str, Any], wiring: dict[str, Any],
                 shared: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None, road: str = "pipeline"):
    """Build stage `name`'s config by the precedence rule above; a section key that the wiring sets is an error."""
    clash = sorted(set(wiring) & set(section))
    if clash:
        raise cfg.ConfigError(f"{road}: '{name}.{clash[0]}' is set by the {road} itself (it connects the stages); "
                              f"set it at the top level instead")
    return cfg.build(cls, {**(defaults or {}), **(shared or {}), **section, **wiring}, where=f"{road} section '{name}'")


def input_fingerprints(config: Any, resolve: Callable[[str], Path]) -> dict[str, str]:
    """The fingerprint (`cfg.fingerprint`) of every file or folder the config names, its output excepted; a
    built-in data set (`builtin:NAME`) by the file `resolve` (`rlhf.data.resolve_data_path`, a layer above this
    module, hence passed in and never optional) gives for it, so that a package whose built-in data changed reruns
    the stages that read it."""
    found = {}
    for key, value in cfg.to_dict(config).items():
        values = value if isinstance(value, list) else [value]
        for i, item in enumerate(values):
            if key == "output_dir" or not isinstance(item, str) or not item:
                continue
            if item.startswith("builtin:"):
                try:
                    item = str(resolve(item))
                except (OSError, ValueError):  # unknown or unavailable: the stage itself says so
                    continue
            if Path(item).exists():
                found[key if len(values) == 1 else f"{key}[{i}]"] = cfg.fingerprint(item)
    return found


def rerun_reason(done: dict, wanted: dict, inputs: dict[str, str], output: Path | None) -> str | None:
    """Why a stage that finished earlier must run again (None: it need not)."""
    if done.get("config") != wanted:
        keys = sorted(k for k in set(done.get("config", {})) | set(wanted)
                      if done.get("config", {}).get(k) != wanted.get(k))
        return f"config changed since the last run ({', '.join(keys)})"
    if output is not None and not (output.exists() and any(output.iterdir())):
        return f"its output {output} is missing"
    before = done.get("inputs", {})
    changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
    if changed:
        return f"its input changed ({', '.join(changed)})"
    return None


def run_stage(name: str, run: Callable[[Any], Any], config: Any, markers: Path, *, resolve: Callable[[str], Path],
              force: bool = False, road: str = "pipeline") -> tuple[Any, bool]:
    """`run(config)`, unless the marker says this stage finished with this very config and these very inputs, and
    its output is still there (and `force` is off). → (its result, whether it ran). The marker is written atomically
    after the stage returns."""
    marker = markers / f"{name}.json"
    wanted = json.loads(json.dumps(cfg.to_dict(config), default=str))
    output = Path(config.output_dir) if getattr(config, "output_dir", "") else None
    if not force and marker.is_file():
        done = json.loads(marker.read_text())
        reason = rerun_reason(done, wanted, input_fingerprints(config, resolve), output)
        if reason is None:
            say(f"[{road}] {name}: finished earlier, skipped ({marker})")
            return done.get("result"), False
        say(f"[{road}] {name}: {reason}; rerunning it and the stages after it")
    result = run(config)
    if distributed.is_main():  # under torchrun: rank 0's result, written once; every stage ends with the processes
        markers.mkdir(parents=True, exist_ok=True)  # together, so they all took the same decisions up to here
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": wanted, "inputs": input_fingerprints(config, resolve), "result": result},
                                  indent=2, default=str))
        tmp.replace(marker)
    distributed.barrier()
    return result, True


def run_road(stages: dict[str, tuple[Callable[[Any], Any], Any]], markers: Path, *, resolve: Callable[[str], Path],
             road: str = "pipeline") -> tuple[dict[str, Any], list[str]]:
    """Run each (function, config) in order through `run_stage`; once one runs, every later one runs too.
    → (each stage's result, the names of the stages that ran this time)."""
    results: dict[str, Any] = {}
    ran: list[str] = []
    for name, (run, config) in stages.items():
        results[name], did_run = run_stage(name, run, config, markers, force=bool(ran), road=road, resolve=resolve)
        ran += [name] if did_run else []
    return results, ran
