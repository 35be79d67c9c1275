"""`rlhf study kl-sweep`: PPO at several KL coefficients β from the same SFT model and reward model, and the
over-optimisation curve: gold and reward-model score against the KL the policy travelled from the SFT model.
`rlhf study critic-free`: PPO, GRPO, Dr. GRPO and RLOO (the `methods`) from the same SFT model and reward model,
each sampling the same number of answers, compared on held-out prompts (see `compare` below).

What it should show (Gao et al. 2022, "Scaling laws for reward model overoptimization"): without the KL
penalty (β = 0) the policy travels far from its start and the reward model's score keeps climbing while the
gold score stalls or falls, because the policy exploits the reward model's mistakes; with the penalty it stays
close, and both scores rise together.
How: one `ppo.main` per β into OUT/beta_<β>/ppo (OUT = RUN/sweep), through `rlhf.wiring` like a pipeline stage
(the same precedence; a β that already finished with the same settings is kept), then one held-out evaluation
of the SFT model and every policy together (gold, reward model, KL to SFT, win rate, length, repetition), then
sweep.json, sweep.png and a table with a verdict per β.
Our deviations: Gao et al. vary how long a policy trains and plot against √KL; we vary β at a fixed number
of steps and plot against KL (the x axis of PPO's own logs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf import config as cfg
from rlhf import evaluate, ppo, wiring
from rlhf.data import resolve_data_path
from rlhf.hardware import Precision
from rlhf.plots import figure_png, new_figure
from rlhf.results import result_rows
from rlhf.tracking import last_run, read_jsonl, say, table

POSITIONAL = "study"  # `rlhf study kl-sweep ...` reads as `rlhf study --study kl-sweep ...`
STUDIES = ("kl-sweep", "critic-free")
# critic-free study: method → (its name in tables, the PPO stage's settings that make it that method). The KL goes where
# each method's paper puts it; GRPO averages its loss over tokens as TRL and DAPO do, Dr. GRPO by a constant.
METHODS = {
    "gae": ("PPO", {"kl_in": "reward", "loss_aggregation": "token"}),
    "grpo": ("GRPO", {"kl_in": "loss", "loss_aggregation": "token"}),
    "dr_grpo": ("Dr. GRPO", {"kl_in": "loss", "loss_aggregation": "constant"}),
    "rloo": ("RLOO", {"kl_in": "reward", "loss_aggregation": "token"}),
    "reinforce_pp": ("REINFORCE++", {"kl_in": "reward", "loss_aggregation": "token"}),
}


@dataclass
class Config:
    study: str = cfg.field("kl-sweep", "which study: kl-sweep or critic-free")
    run_dir: str = cfg.field("runs/demo", "a pipeline run folder: RUN/sft is every policy's start and KL reference, "
                                          "RUN/reward the reward model")
    output_dir: str = cfg.field("", "where the sweep is written ('' = RUN_DIR/sweep)")
    betas: list[float] = cfg.field([0.0, 0.01, 0.05, 0.2], "KL coefficients β, one PPO run each (0 = no KL penalty)")
    methods: list[str] = cfg.field(list(METHODS)[:4], "critic-free study: the advantage choices compared, one run "
                                                      f"each, from: {', '.join(METHODS)}")
    group_size: int = cfg.field(4, "critic-free study: answers per prompt of the group methods (PPO and "
                                   "REINFORCE++: one per prompt); every method samples batch_size answers a step")
    beta: float = cfg.field(0.05, "critic-free study: the KL coefficient β of every method")
    steps: int = cfg.field(12, "PPO iterations per β")
    batch_size: int = cfg.field(32, "responses sampled per PPO iteration")
    mini_batch_size: int = cfg.field(16, "responses per gradient step")
    max_new_tokens: int = cfg.field(64, "longest response in tokens (PPO and the evaluation)")
    lr: float = cfg.field(1e-5, "policy learning rate")
    monitor_every: int = cfg.field(4, "PPO's reward-hacking monitor every N steps (0 = off)")
    ppo: dict = cfg.field({}, "any other PPO settings, the same for every β (see `rlhf ppo --help`)")
    eval_prompts: str = cfg.field("builtin:prompts_heldout", "held-out prompts of the final evaluation")
    max_prompts: int = cfg.field(64, "held-out prompts evaluated (0 = all)")
    eval: dict = cfg.field({}, "any other evaluation settings (see `rlhf eval --help`)")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    seed: int = cfg.field(0, "random seed (the same for every β: the runs differ only in β)")


def held_out_eval(config, run: Path, out: Path, trained: list) -> evaluate.Config:
    """One evaluation of the run's SFT model and every trained policy, on the same held-out prompts, at the first
    policy's temperature; SFT is the KL reference."""
    sft = str(run / "sft")
    return wiring.stage_config(evaluate.Config, "eval", section=config.eval, road="study", shared={
        "max_new_tokens": config.max_new_tokens, "temperature": trained[0].temperature}, wiring={
        "models": [sft] + [c.output_dir for c in trained], "reference": sft,
        "reward_model": str(run / "reward"), "data": config.eval_prompts, "output_dir": str(out / "eval"),
        "max_prompts": config.max_prompts, "bf16": config.bf16, "device": config.device})


def ppo_config(config: Config, run: Path, folder: Path, beta: float, method: str = "gae") -> ppo.Config:
    """The PPO settings of one β (and method): the method's own settings, then the study's shared settings, then
    its `ppo` section, then the wiring (fixed β, the method's advantage and group size, the run's models, the
    study's device, precision and seed)."""
    pipeline_file = run / "config.yaml"  # train on the prompts the run's reward model was trained for
    prompts = cfg.read_yaml(pipeline_file).get("prompts") if pipeline_file.is_file() else None
    shared = {"steps": config.steps, "batch_size": config.batch_size, "mini_batch_size": config.mini_batch_size,
              "max_new_tokens": config.max_new_tokens, "lr": config.lr, "monitor_every": config.monitor_every,
              **({"data": prompts} if prompts else {})}
    wired = {"policy": str(run / "sft"), "reward_model": str(run / "reward"), "output_dir": str(folder / "ppo"),
             "beta": beta, "target_kl": 0.0, "device": config.device, "bf16": config.bf16, "seed": config.seed}
    if config.study == "critic-free":  # every method samples batch_size answers a step: k to each of fewer prompts
        grouped = method in ("grpo", "dr_grpo", "rloo")
        wired.update({"advantage": method, "group_size": config.group_size if grouped else 1})
    return wiring.stage_config(ppo.Config, "ppo", section=config.ppo, wiring=wired, shared=shared, road="study",
                               defaults=METHODS[method][1] if config.study == "critic-free" else None)


def verdict(row: dict) -> str:
    """What the paired 95% intervals against SFT say about a policy's reward-model and gold scores."""
    if "reward_model_diff_ci" not in row or "gold_diff_ci" not in row:
        return "-"
    rm_up = row["reward_model_diff_ci"][0] > 0
    gold_up, gold_down = row["gold_diff_ci"][0] > 0, row["gold_diff_ci"][1] < 0
    if rm_up and gold_up:
        return "both rose"
    if rm_up:
        return "RM rose, gold fell: over-optimised" if gold_down else "RM rose, gold stalled: over-optimised"
    return "gold rose, RM did not" if gold_up else "no clear change"


def plot_sweep(sweep: dict) -> bytes:
    """Top: the held-out scores at the end of training against KL to SFT, one point per β (SFT at KL 0).
    Bottom: each β's path over its training steps (scores of the training batches against their KL)."""
    figure, axes = new_figure(4, columns=2, size=(5.5, 3.6))
    base = sweep["baseline"]
    for column, (key, title) in enumerate((("gold", "gold score"), ("reward_model", "reward-model score"))):
        ax = axes[column]
        if key in base:
            ax.errorbar([0.0], [base[key]],
                        yerr=[[base[key] - base[f"{key}_ci"][0]], [base[f"{key}_ci"][1] - base[key]]],
                        fmt="s", color="black", capsize=4, label="SFT")
        for n, point in enumerate(sweep["points"]):
            if key in point:
                low, high = point[f"{key}_ci"]
                ax.errorbar([point["kl"]], [point[key]], yerr=[[point[key] - low], [high - point[key]]], fmt="o",
                            color=f"C{n}", capsize=4, label=f"β={point['beta']:g}")
        ax.set_title(f"held-out {title} after training", fontsize=10)
        ax.set_xlabel("KL to SFT (nats per answer)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[2 + column]
        for n, point in enumerate(sweep["points"]):
            path = [r for r in sweep["curves"].get(f"{point['beta']:g}", []) if f"{key}_score" in r and "kl" in r]
            ax.plot([r["kl"] for r in path], [r[f"{key}_score"] for r in path], "o-", markersize=3, color=f"C{n}",
                    label=f"β={point['beta']:g}")
        ax.set_title(f"{title} of the training batches, step by step", fontsize=10)
        ax.set_xlabel("KL to SFT (nats per answer)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle("KL sweep: does the gold score follow the reward model's? (Gao et al. 2022)", fontsize=12)
    return figure_png(figure)


def main(config: Config) -> dict:
    if config.study not in STUDIES:
        raise ValueError(f"unknown study '{config.study}'; known: {', '.join(STUDIES)}")
    run = Path(config.run_dir)
    for needed in ("sft", "reward"):
        if not (run / needed / "config.json").is_file():
            raise FileNotFoundError(f"{run / needed}: no model there; {config.study} needs a run folder from `rlhf "
                                    f"pipeline` (its sft/ and reward/)")
    if config.study == "critic-free":
        return compare(config, run)
    if not config.betas:
        raise ValueError("kl-sweep: give at least one β in 'betas'")
    out = Path(config.output_dir) if config.output_dir else run / "sweep"
    started = time.time()
    configs = {beta: ppo_config(config, run, out / f"beta_{beta:g}", beta) for beta in config.betas}
    sft = str(run / "sft")
    eval_config = held_out_eval(config, run, out, list(configs.values()))
    say(f"[study] kl-sweep: β = {', '.join(f'{b:g}' for b in config.betas)}, {config.steps} PPO steps each, from {run}")

    # 1. one PPO run per β, from the same SFT model and reward model with the same seed
    ppo_seconds: dict[float, float] = {}
    for number, (beta, ppo_cfg) in enumerate(configs.items(), start=1):
        say(f"[study] β={beta:g} ({number}/{len(configs)}): PPO → {ppo_cfg.output_dir}")
        began = time.time()
        _, ran = wiring.run_stage("ppo", ppo.main, ppo_cfg, Path(ppo_cfg.output_dir).parent / "stages", road="study",
                                  resolve=resolve_data_path)
        if ran:
            ppo_seconds[beta] = time.time() - began
            left = len(configs) - number
            say(f"[study] β={beta:g} done in {ppo_seconds[beta]:.0f} s; {(time.time() - started) / 60:.1f} min so far"
                + (f", about {left * ppo_seconds[beta] / 60:.0f} min of PPO left" if left else ""))

    # 2. one held-out evaluation of SFT and every policy: gold and reward-model score, KL to SFT, win rate
    eval_began = time.time()
    names = {sft: "SFT", **{ppo_cfg.output_dir: f"β={beta:g}" for beta, ppo_cfg in configs.items()}}
    result = evaluate.main(eval_config, names=names)
    eval_seconds = time.time() - eval_began

    # 3. the over-optimisation curve: one point per β from the evaluation, each β's path from its PPO log
    rows = {r["model"]: r for r in result["rows"]}
    points = []
    for beta, ppo_cfg in configs.items():
        row = rows[ppo_cfg.output_dir]
        points.append({"beta": beta, "kl": row["kl_to_reference"], "verdict": verdict(row),
                       "ppo_seconds": round(ppo_seconds.get(beta, 0.0), 1),
                       **{k: v for k, v in row.items() if k not in ("model", "kl_to_reference")}})
    curves = {}
    for beta, ppo_cfg in configs.items():
        log_rows, _ = last_run(read_jsonl(Path(ppo_cfg.output_dir).parent / "ppo_logs" / "metrics.jsonl"))
        curves[f"{beta:g}"] = [{k: r[k] for k in ("step", "kl", "reward_model_score", "gold_score", "monitor/gold",
                                                  "monitor/reward_model") if k in r} for r in log_rows]

    # 4. the table, the verdict on the claim, sweep.json and sweep.png
    cells = result_rows(result, names)
    shown = [{"β": cell["model"], **{k: v for k, v in cell.items() if k != "model"},
              "verdict": "(baseline)" if row["model"] == sft else verdict(row)}
             for cell, row in zip(cells, result["rows"])]
    no_penalty = [p for p in points if p["beta"] == 0]
    penalised = [p for p in points if p["beta"] > 0]
    claim = None
    if no_penalty and penalised:
        claim = (no_penalty[0]["verdict"].endswith("over-optimised")
                 and any(p["verdict"] == "both rose" for p in penalised))
    seconds = {"ppo": round(sum(ppo_seconds.values()), 1), "eval": round(eval_seconds, 1),
               "total": round(time.time() - started, 1)}
    sweep = {"run_dir": str(run), "betas": config.betas, "steps": config.steps, "baseline": rows[sft], "points": points,
             "curves": curves, "table": shown, "claim_holds": claim, "seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("sweep.json", json.dumps(sweep, indent=2).encode()), ("sweep.png", plot_sweep(sweep))):
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)
    say("\nKL sweep (held-out; Δ and win rate against SFT with 95% intervals):\n" + table(shown))
    if claim is not None:
        say(f"\nClaim 'without the KL penalty the reward model's score climbs while the gold score stalls or falls; "
            f"with it both rise together': {'holds' if claim else 'does NOT hold'} on this sweep "
            f"(β=0: {no_penalty[0]['verdict']}; "
            + "; ".join(f"β={p['beta']:g}: {p['verdict']}" for p in penalised) + ")")
    say(f"[study] wrote {out / 'sweep.json'} and {out / 'sweep.png'}; took {seconds['total'] / 60:.1f} min "
        f"(PPO {seconds['ppo'] / 60:.1f} min, evaluation {seconds['eval'] / 60:.1f} min)")
    return sweep


def compare(config: Config, run: Path) -> dict:
    """`rlhf study critic-free`: one run per method from the same SFT model and reward model with the same seed, β,
    steps and answers sampled per step (batch_size: PPO one answer to each of batch_size prompts, the group methods
    group_size answers to each of batch_size / group_size), then one held-out evaluation of SFT and every policy
    together, then comparison.json, comparison.png and the table (gold score, win rate against SFT with 95%
    intervals, KL to SFT, length, wall time)."""
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise ValueError(f"critic-free: methods must be some of {', '.join(METHODS)}, got {config.methods}")
    if config.batch_size % config.group_size:
        raise ValueError(f"critic-free: batch_size ({config.batch_size}) must be a multiple of group_size "
                         f"({config.group_size}), so that every method samples the same number of answers")
    out = Path(config.output_dir) if config.output_dir else run / "critic_free"
    started = time.time()
    configs = {m: ppo_config(config, run, out / m, config.beta, m) for m in config.methods}
    sft = str(run / "sft")
    eval_config = held_out_eval(config, run, out, list(configs.values()))
    say(f"[study] critic-free: {', '.join(METHODS[m][0] for m in configs)}, {config.steps} steps of "
        f"{config.batch_size} answers each (groups of {config.group_size}), β={config.beta:g}, from {run}")

    # 1. one run per method, from the same SFT model and reward model with the same seed
    seconds: dict[str, float] = {}
    for number, (method, stage) in enumerate(configs.items(), start=1):
        say(f"[study] {METHODS[method][0]} ({number}/{len(configs)}) → {stage.output_dir}")
        wiring.run_stage("ppo", ppo.main, stage, Path(stage.output_dir).parent / "stages", road="study",
                         resolve=resolve_data_path)
        summary_file = Path(stage.output_dir) / "rlhf_summary.json"
        seconds[method] = json.loads(summary_file.read_text())["seconds"]  # its own wall time, also when kept

    # 2. one held-out evaluation of SFT and every policy: gold and reward-model score, KL to SFT, win rate
    eval_began = time.time()
    names = {sft: "SFT", **{stage.output_dir: METHODS[m][0] for m, stage in configs.items()}}
    result = evaluate.main(eval_config, names=names)
    eval_seconds = time.time() - eval_began

    # 3. each method's row and its training curve (the training batches' scores and KL, step by step)
    rows = {r["model"]: r for r in result["rows"]}
    points, curves = [], {}
    for method, stage in configs.items():
        points.append({"method": method, "name": METHODS[method][0], "seconds": seconds[method],
                       **{k: v for k, v in rows[stage.output_dir].items() if k != "model"}})
        log_rows, _ = last_run(read_jsonl(Path(stage.output_dir).parent / "ppo_logs" / "metrics.jsonl"))
        curves[method] = [{k: r[k] for k in ("step", "kl", "score", "reward_model_score", "gold_score") if k in r}
                          for r in log_rows]

    # 4. the table, comparison.json and comparison.png
    cells = result_rows(result, names)
    wall = {stage.output_dir: seconds[m] for m, stage in configs.items()}
    shown = [{**cell, "wall time (min)": f"{wall[row['model']] / 60:.1f}" if row["model"] in wall else "-"}
             for cell, row in zip(cells, result["rows"])]
    comparison = {"run_dir": str(run), "methods": config.methods, "steps": config.steps,
                  "answers_per_step": config.batch_size, "group_size": config.group_size, "beta": config.beta,
                  "baseline": rows[sft], "points": points, "curves": curves, "table": shown,
                  "seconds": {"training": round(sum(seconds.values()), 1), "eval": round(eval_seconds, 1),
                              "total": round(time.time() - started, 1)}}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("comparison.json", json.dumps(comparison, indent=2).encode()),
                       ("comparison.png", plot_comparison(comparison))):
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)
    say(f"\nCritic-free comparison (held-out, {result['prompts']} prompts; Δ and win rate against SFT with 95% "
        f"intervals; {config.batch_size} answers sampled per step by every method):\n" + table(shown))
    say(f"[study] wrote {out / 'comparison.json'} and {out / 'comparison.png'}; took "
        f"{comparison['seconds']['total'] / 60:.1f} min")
    return comparison


def plot_comparison(comparison: dict) -> bytes:
    """Top: held-out gold score (SFT and each method) and win rate against SFT, with 95% intervals. Bottom: each
    method's training batches, step by step: score and KL to SFT."""
    figure, axes = new_figure(4, columns=2, size=(5.5, 3.6))
    base, points = comparison["baseline"], comparison["points"]
    names = ["SFT"] + [p["name"] for p in points]
    for column, (key, title) in enumerate((("gold", "held-out gold score"), ("win_rate", "gold win rate vs SFT"))):
        ax = axes[column]
        rows = ([base] if key == "gold" else []) + points
        for n, row in enumerate(rows):
            if key in row and f"{key}_ci" in row:
                low, high = row[f"{key}_ci"]
                label = names[n] if key == "gold" else row["name"]
                ax.errorbar([label], [row[key]], yerr=[[row[key] - low], [high - row[key]]], fmt="o", capsize=4,
                            color="black" if label == "SFT" else f"C{names.index(label) - 1}")
        if key == "win_rate":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for column, (key, title) in enumerate((("score", "training score"), ("kl", "KL to SFT (nats per answer)"))):
        ax = axes[2 + column]
        for n, point in enumerate(points):
            path = [r for r in comparison["curves"].get(point["method"], []) if key in r]
            ax.plot([r["step"] for r in path], [r[key] for r in path], "o-", markersize=3, color=f"C{n}",
                    label=point["name"])
        ax.set_title(f"{title}, training batches", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle(f"PPO and the critic-free methods at {comparison['answers_per_step']} answers per step",
                    fontsize=12)
    return figure_png(figure)
