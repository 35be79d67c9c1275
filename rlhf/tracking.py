"""Metrics to JSONL and TensorBoard (and reading them back), printing on rank 0 only, small terminal tables, seeding."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Generator

import torch

from rlhf.distributed import is_main


def say(*args: Any) -> None:
    if is_main():
        print(*args, flush=True)


def run_to_end(steps: Generator[Any, None, Any]) -> Any:
    """Exhaust a stage's `training` generator (one yield per step) and return its return value, the summary."""
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


class RunLog:
    """Appends one JSON line per step to `metrics.jsonl` and the scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.writer = None
        self.file = None
        if not is_main():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file = (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.writer:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        return row

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain aligned text table (floats to 3 decimals)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def last_run(rows: list[dict]) -> tuple[list[dict], int]:
    """A metrics log is appended to by every run of its stage: keep the last run (where the step last went back)
    → (its rows, how many runs the log holds)."""
    starts = [0] + [i for i in range(1, len(rows)) if rows[i].get("step", 0) <= rows[i - 1].get("step", 0)]
    return rows[starts[-1]:], len(starts)
