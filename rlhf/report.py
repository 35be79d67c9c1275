"""`rlhf report RUN_DIR`: one self-contained HTML page per run, to see whether the run improved what people
care about (the gold score) or only what the reward model rewards.

What it shows: the reward-hacking monitor's alarms; the before/after table of the held-out evaluation and
its picture; reward model vs gold score over PPO's steps; the curves of every stage whose log exists (SFT,
reward, PPO, DPO, whatever comes later); the KL sweep and the critic-free comparison if they ran; answers side by
side; the config.
How: matplotlib draws PNGs (no pyplot, no display) that the page embeds as data: URIs, with its style inline.
The page loads nothing and runs no script (its Content-Security-Policy forbids both) and every prompt and
answer is escaped, so it opens from disk offline and an answer containing markup shows as text.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import config as cfg
from rlhf.plots import figure_png, new_figure
from rlhf.results import describe_result, result_rows
from rlhf.tracking import last_run, read_jsonl, say

POSITIONAL = "run_dir"  # `rlhf report RUN_DIR` reads as `rlhf report --run_dir RUN_DIR`
STAGE_ORDER = ["sft", "reward", "ppo", "dpo"]  # the stages we know come first; any other log after them
# the curves a reader looks for first; every other numeric metric follows, alphabetically
FIRST_METRICS = ["reward_model_score", "score", "gold_score", "monitor/reward_model", "monitor/gold", "kl", "beta",
                 "response_length", "monitor/length", "monitor/distinct2", "loss", "policy_loss", "value_loss",
                 "accuracy", "margin", "chosen_reward", "rejected_reward", "entropy", "ended_fraction"]
SKIPPED_METRICS = {"step", "time", "monitor/warning"}


@dataclass
class Config:
    run_dir: str = cfg.field("runs/demo", "the run folder to report on (also written `rlhf report RUN_DIR`)")
    output: str = cfg.field("", "the HTML file to write ('' = RUN_DIR/report.html)")
    samples: int = cfg.field(6, "held-out prompts shown with every model's answer side by side")


# --- reading the run folder ----------------------------------------------------------------------


def stage_logs(run: Path) -> dict[str, tuple[list[dict], int]]:
    """Every `<stage>_logs/metrics.jsonl` below the run folder: the known stages in pipeline order, then the rest."""
    found = {p.parent.name[: -len("_logs")]: p for p in run.glob("*_logs/metrics.jsonl")}
    order = [s for s in STAGE_ORDER if s in found] + sorted(s for s in found if s not in STAGE_ORDER)
    return {stage: last_run(read_jsonl(found[stage])) for stage in order if read_jsonl(found[stage])}


def short_name(model: str, run: Path) -> str:
    """A checkpoint path as the reader knows it: relative to the run folder (`ppo`, `sweep/beta_0/ppo`)."""
    try:
        return str(Path(model).resolve().relative_to(run.resolve()))
    except ValueError:
        return Path(model).name or model


# --- pictures ------------------------------------------------------------------------------------


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def plot_stage(stage: str, rows: list[dict]) -> bytes:
    """Every numeric metric of a stage over its steps, one small panel each (sparse ones, like the monitor's, as
    dots)."""
    numeric = {k for r in rows for k, v in r.items()
               if k not in SKIPPED_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in FIRST_METRICS if k in numeric] + sorted(numeric - set(FIRST_METRICS))
    figure, axes = new_figure(len(keys))
    for ax, key in zip(axes, keys):
        steps, values = series(rows, key)
        sparse = len(steps) < len(rows) / 2 or len(steps) < 3
        ax.plot(steps, values, "o-" if sparse else "-", color="tab:red" if key.startswith("monitor/") else "tab:blue",
                markersize=4, linewidth=1.5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle(f"{stage}: every logged metric", fontsize=12)
    return figure_png(figure)


def plot_reward_vs_gold(rows: list[dict]) -> bytes | None:
    """The reward-hacking picture: the reward model's score and the gold score over the same steps, on the
    training batches (lines) and on the monitor's fixed held-out batch (dots); monitor alarms as red lines."""
    panels = [("reward model score", ["reward_model_score", "monitor/reward_model"]),
              ("gold score", ["gold_score", "monitor/gold"]),
              ("KL to the reference, β", ["kl", "beta"]),
              ("answer length (tokens), distinct-2", ["response_length", "monitor/length", "monitor/distinct2"])]
    panels = [(title, [k for k in keys if series(rows, k)[0]]) for title, keys in panels]
    if not (panels[0][1] and panels[1][1]):  # a stage without both scores (SFT, DPO) has no such picture
        return None
    panels = [(title, keys) for title, keys in panels if keys]
    alarms = [r["step"] for r in rows if r.get("monitor/warning")]
    figure, axes = new_figure(len(panels), columns=len(panels), size=(4.2, 3.0))
    for ax, (title, keys) in zip(axes, panels):
        for n, key in enumerate(keys):
            steps, values = series(rows, key)
            target = ax.twinx() if key in ("beta", "monitor/distinct2") else ax  # a different scale: its own axis
            held_out = key.startswith("monitor/")
            target.plot(steps, values, "o-" if held_out else "-", color=f"C{n}", markersize=5,
                        linewidth=2 if held_out else 1.2,
                        label=("held-out monitor: " if held_out else "training batch: ") + key)
            target.tick_params(labelsize=8)
            if target is not ax:
                target.legend(fontsize=7, loc="lower right")
        for step in alarms:
            ax.axvline(step, color="red", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    figure.suptitle("Did the run improve what people care about (gold) or only what the reward model rewards?"
                    + ("  (red dashes: monitor alarms)" if alarms else ""), fontsize=11)
    return figure_png(figure)


def plot_eval(result: dict, names: dict[str, str]) -> bytes:
    """The held-out evaluation as bars, one panel per measure, 95% intervals as error bars where there are some."""
    measures = [("gold", "gold score"), ("reward_model", "reward model score"), ("win_rate", "win rate vs baseline"),
                ("kl_to_reference", "KL to reference"), ("length_tokens", "length (tokens)"),
                ("distinct2", "distinct-2"), ("refusal_harmful", "refused harmful requests")]
    rows = result["rows"]
    measures = [(key, title) for key, title in measures if any(key in r for r in rows)]
    figure, axes = new_figure(len(measures), columns=4, size=(3.2, 2.6))
    labels = [names.get(r["model"], r["model"]) for r in rows]
    for ax, (key, title) in zip(axes, measures):
        values = [r.get(key, float("nan")) for r in rows]
        errors = None
        if all(f"{key}_ci" in r for r in rows if key in r):
            low = [v - r[f"{key}_ci"][0] if key in r else 0.0 for v, r in zip(values, rows)]
            high = [r[f"{key}_ci"][1] - v if key in r else 0.0 for v, r in zip(values, rows)]
            errors = [low, high]
        ax.bar(range(len(rows)), values, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return figure_png(figure)


# --- the page ------------------------------------------------------------------------------------


# C0 and C1 control characters (tab, newline and carriage return aside): HTML forbids them, and model output holds
# them now and then (NUL bytes included)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def esc(value: Any) -> str:
    """Text for HTML: escaped, control characters shown as \\xNN, lone surrogates as \\udNNN (never written raw)."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def image(png: bytes, alt: str) -> str:
    return f'<img class="plot" src="{data_uri(png)}" alt="{esc(alt)}">'


def html_table(columns: list[str], rows: list[list[Any]], css: str = "") -> str:
    """Every cell escaped; a cell given as (text, note) shows the note small under the text."""
    def cell(value: Any) -> str:
        if isinstance(value, tuple):
            text, note = value
            return f'<div class="text">{esc(text)}</div><div class="note">{esc(note)}</div>'
        return esc(value)

    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def scores_note(row: dict, model: str) -> str:
    parts = [f"{label} {row[f'{model}_{key}']:.3f}" for key, label in (("gold", "gold"), ("reward_model", "RM"))
             if isinstance(row.get(f"{model}_{key}"), (int, float))]
    if f"{model}_refused" in row:
        parts.append("refused" if row[f"{model}_refused"] else "complied")
    return ", ".join(parts)


def side_by_side(rows: list[dict], models: list[str], names: dict[str, str], limit: int) -> str:
    return html_table(["prompt"] + [names.get(m, m) for m in models],
                      [[row["prompt"]] + [(row.get(m, ""), scores_note(row, m)) for m in models]
                       for row in rows[:limit]],
                      css="samples")


def over_steps(samples: list[dict]) -> str:
    """Answers to the same prompt across training steps, one row per prompt, one column per step."""
    steps = sorted({s["step"] for s in samples})
    by_prompt: dict[str, dict[int, dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], {})[s["step"]] = s
    rows = []
    for prompt, answers in by_prompt.items():
        cells = []
        for step in steps:
            s = answers.get(step)
            note = ", ".join(f"{k} {s[k]:.3f}" for k in ("gold", "reward_model", "score")
                             if isinstance(s.get(k), (int, float))) if s else ""
            cells.append((s["response"], note) if s else "")
        rows.append([prompt] + cells)
    return html_table(["prompt"] + [f"step {s}" for s in steps], rows, css="samples")


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1500px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta, .note { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
table.samples td { white-space: pre-wrap; max-width: 30em; }
img.plot { max-width: 100%; display: block; margin: 0.8em 0; border: 1px solid #eee; }
.alarm { background: #fdecea; border-left: 5px solid #d93025; padding: 0.6em 1em; margin: 0.6em 0; }
.calm { background: #e6f4ea; border-left: 5px solid #188038; padding: 0.6em 1em; margin: 0.6em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
nav a { margin-right: 1em; }
"""


def build_page(run: Path, samples: int) -> tuple[str, int]:
    """→ (the HTML page, how many images it embeds)."""
    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)
    images = 0
    logs = stage_logs(run)
    result_file = run / "eval" / "results.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    names = {r["model"]: short_name(r["model"], run) for r in result["rows"]} if result else {}

    # 1. the monitor's verdict first: it is what a person should not miss
    alarms = [(r["step"], text) for stage in logs.values() for r in stage[0] for text in r.get("monitor/warnings", [])]
    checks = sum(1 for stage in logs.values() for r in stage[0] if "monitor/warning" in r)
    if alarms:
        body = "".join(f'<div class="alarm"><b>WARNING at step {esc(step)}:</b> {esc(text)}</div>'
                       for step, text in alarms)
        sections.append(("monitor", "Reward-hacking monitor", body))
    elif checks:
        sections.append(("monitor", "Reward-hacking monitor",
                         f'<div class="calm">No alarm in {checks} checks of the held-out batch (the monitor warns '
                         f'when the reward model\'s score keeps rising while the gold score falls, or when length or '
                         f'repetition drift).</div>'))

    # 2. the before/after table and its picture
    if result:
        body = f"<p>{esc(describe_result(result, names))}</p>"
        cells = result_rows(result, names)
        body += html_table(list(cells[0]), [list(c.values()) for c in cells])
        body += image(plot_eval(result, names), "held-out evaluation")
        images += 1
        sections.append(("eval", "Before and after", body))

    # 3. reward model vs gold over PPO's steps, then every stage's curves
    for stage, (rows, _) in logs.items():
        png = plot_reward_vs_gold(rows)
        if png:
            sections.append((f"{stage}-gold", f"{stage}: reward model vs gold",
                             image(png, f"{stage} reward model vs gold")))
            images += 1
    for stage, (rows, runs) in logs.items():
        note = (f'<p class="meta">{len(rows)} logged steps'
                + (f"; the log holds {runs} runs, this is the last" if runs > 1 else "") + "</p>")
        sections.append((f"{stage}-curves", f"{stage}: curves",
                         note + image(plot_stage(stage, rows), f"{stage} curves")))
        images += 1

    # 4. the KL sweep, if `rlhf study kl-sweep` ran on this folder
    sweep = run / "sweep" / "sweep.json"
    if sweep.is_file() and (run / "sweep" / "sweep.png").is_file():
        data = json.loads(sweep.read_text())
        body = (html_table(list(data["table"][0]), [list(r.values()) for r in data["table"]])
                if data.get("table") else "")
        body += image((run / "sweep" / "sweep.png").read_bytes(), "KL sweep")
        images += 1
        sections.append(("sweep", "KL sweep: gold and reward-model score against KL", body))
    # ... and the critic-free comparison, if `rlhf study critic-free` ran on it
    comparison = run / "critic_free" / "comparison.json"
    if comparison.is_file() and (run / "critic_free" / "comparison.png").is_file():
        data = json.loads(comparison.read_text())
        body = (html_table(list(data["table"][0]), [list(r.values()) for r in data["table"]])
                if data.get("table") else "")
        body += image((run / "critic_free" / "comparison.png").read_bytes(), "critic-free comparison")
        images += 1
        sections.append(("critic-free", "PPO and the critic-free methods at the same answers per step", body))

    # 5. answers side by side: held-out prompts, harmful requests, the monitor's batch and PPO's batches over steps
    models = [r["model"] for r in result["rows"]] if result else []
    held_out = read_jsonl(run / "eval" / "samples.jsonl")
    if held_out and models:
        sections.append(("samples", "Held-out answers side by side", side_by_side(held_out, models, names, samples)))
    harmful = read_jsonl(run / "eval" / "harmful_samples.jsonl")
    if harmful and models:
        sections.append(("harmful", "Harmful requests (a model should decline)",
                         side_by_side(harmful, models, names, len(harmful))))
    for stage in logs:
        for file, title in (("monitor_samples.jsonl", "the monitor's held-out prompts over steps"),
                            ("samples.jsonl", "training answers over steps")):
            shown = read_jsonl(run / f"{stage}_logs" / file)
            if shown and all("step" in s and "prompt" in s and "response" in s for s in shown):
                sections.append((f"{stage}-{file.split('.')[0]}", f"{stage}: {title}", over_steps(shown)))

    # 6. what ran: each stage's summary and the config
    details = ""
    for marker in sorted((run / "stages").glob("*.json")):
        summary = json.loads(marker.read_text()).get("result")
        details += (f"<details><summary>{esc(marker.stem)}</summary>"
                    f"<pre>{esc(json.dumps(summary, indent=2, default=str))}</pre></details>")
    if (run / "config.yaml").is_file():
        details += (f"<details><summary>config.yaml</summary>"
                    f"<pre>{esc((run / 'config.yaml').read_text())}</pre></details>")
    if details:
        sections.append(("config", "Stage summaries and config", details))

    nav = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title, _ in sections)
    body = "".join(f'<section id="{anchor}"><h2>{esc(title)}</h2>{content}</section>'
                   for anchor, title, content in sections)
    found = ", ".join(logs) or "no stage logs"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rlhf report: {esc(run.name)}</title><style>{STYLE}</style></head>
<body><h1>rlhf report: {esc(run.name)}</h1>
<p class="meta">{esc(run.resolve())}; stages logged: {esc(found)}; written {esc(time.strftime("%Y-%m-%d %H:%M"))}</p>
<nav>{nav}</nav>{body}</body></html>
"""
    return page, images


def main(config: Config) -> dict:
    run = Path(config.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder (give the folder `rlhf pipeline` wrote, e.g. runs/demo)")
    started = time.time()
    page, images = build_page(run, config.samples)
    out = Path(config.output) if config.output else run / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # written whole, then renamed: never half a page
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    say(f"[report] {out} ({images} images, {len(page) / 1e6:.1f} MB, {time.time() - started:.1f} s); "
        f"open it in a browser, no server needed")
    return {"path": str(out), "images": images, "bytes": len(page)}
