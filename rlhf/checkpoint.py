"""A training stage's whole state, saved every `save_every` steps and on SIGTERM/SIGINT, so that rerunning the same
command continues where a killed run stopped, to the same weights bit for bit.

Layout (`<output_dir>_state/step-000012/`), one process without FSDP:
  model/<name>.safetensors   every module's state dict (policy, value head or critic), full precision
  trainer.pt                 optimiser, scheduler, the RNGs (python, numpy, torch, each CUDA device), the data order
                             and position, and the stage's own values (PPO's β, the monitor's history, ...)
  meta.json                  step, the config and the fingerprints of the inputs it ran with
Under torchrun (or with FSDP in one process) the weights and the optimiser are sharded, and each process writes its
own shards with `torch.distributed.checkpoint` (DCP):
  dcp/                       every module's and the optimiser's state, `__<rank>_0.distcp` per process + `.metadata`
  rng-rank<r>.pt             each process's RNGs (they differ: each samples its own answers)
  trainer.pt, meta.json      as above, without the optimiser; written by rank 0 (meta.json records the processes)
A DCP state resumes on any number of processes, one included (DCP reshards on load); a one-process state resumes in
one process only (it is refused by name under torchrun).
Each state folder is written into `.step-N.tmp-*` and renamed in; the last `keep_last` are kept.

A resume is refused when the config (except the keys that only say how to save or log) or an input file changed,
naming what differs; `resume_force` overrides, `resume: never` starts over.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from rlhf import config as cfg
from rlhf import distributed
from rlhf.distributed import SettingError, is_main, world_size
from rlhf.tracking import say

# keys that change how a run saves, logs or recovers, not what it computes: a resume may change them
NOT_FINGERPRINTED = {"save_every", "keep_last", "resume", "resume_force", "log_every", "max_bad_steps", "sample_every",
                     "output_dir"}


class ResumeError(ValueError):
    """A saved state that does not belong to this run (another config or other inputs)."""


class StageInterrupted(Exception):
    """SIGTERM or SIGINT arrived; the state was saved at `step` (the steps done) before stopping."""

    def __init__(self, stage: str, signal_number: int, step: int, folder: Path):
        self.stage, self.signal_number, self.step, self.folder = stage, signal_number, step, folder
        where = f"state saved in {folder} after {step} steps"
        super().__init__(f"{stage}: stopped by {signal.Signals(signal_number).name}; {where}; rerun the same command "
                         f"to continue")


def _sharded(modules: dict[str, torch.nn.Module]) -> bool:
    """Whether the state is written with DCP: more than one process, or a model sharded by FSDP (in one process)."""
    return world_size() > 1 or any(distributed.is_sharded(m) for m in modules.values())


def _local(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with each sharded tensor as this process's own shard."""
    from torch.distributed.tensor import DTensor

    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


def _rng_states() -> dict[str, Any]:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class TrainingState:
    """Saving and resuming one stage's state. `modules`, `optimizer` and `scheduler` are the live objects; `extra`
    are the stage's own picklable values (the data order, its own `random.Random` states, β, histories).

    Also holds the SIGTERM/SIGINT handlers while the stage trains (`watch_signals` ... `release_signals`): a signal
    only sets a flag, and the loop saves and stops at the end of the step it is in (`stop_if_asked`).
    """

    def __init__(self, stage: str, config: Any, inputs: dict[str, str | Path], out_dir: str | Path):
        self.stage = stage
        self.folder = Path(out_dir).parent / f"{Path(out_dir).name}_state"
        self.save_every, self.keep_last = config.save_every, config.keep_last
        self.mode, self.force = config.resume, config.resume_force
        self.config = {k: v for k, v in json.loads(json.dumps(cfg.to_dict(config), default=str)).items()
                       if k not in NOT_FINGERPRINTED}
        self.inputs = {name: cfg.fingerprint(path) for name, path in inputs.items()}
        self.signal_number: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self.last_saved: Path | None = None

    # --- finding and checking a saved state ---------------------------------------------------------------
    def saved(self) -> list[Path]:
        """The complete state folders, oldest first; removes the temp folders of saves that were killed."""
        if not self.folder.is_dir():
            return []
        for stale in self.folder.glob(".step-*.tmp-*") if is_main() else []:  # another process may be writing one
            shutil.rmtree(stale, ignore_errors=True)
        return sorted(p for p in self.folder.glob("step-*") if (p / "meta.json").is_file())

    def latest(self) -> Path | None:
        """The state to resume from (None: start at step 0), after `resume` and the config/input checks."""
        states = self.saved()
        if self.mode == "never":
            if states:
                say(f"[{self.stage}] resume: never; removing the saved state in {self.folder}")
                if is_main():
                    shutil.rmtree(self.folder, ignore_errors=True)
                distributed.barrier()
            return None
        if not states:
            if self.mode == "must":
                raise ResumeError(f"{self.stage}: resume: must, but there is no saved state in {self.folder}")
            return None
        meta = json.loads((states[-1] / "meta.json").read_text())
        differences = [f"config key '{k}' ({meta['config'].get(k)!r} then, {self.config.get(k)!r} now)"
                       for k in sorted(set(meta["config"]) | set(self.config))
                       if meta["config"].get(k) != self.config.get(k)]
        differences += [f"input '{k}' ({meta['inputs'].get(k, 'missing')} then, {self.inputs.get(k, 'missing')} now)"
                        for k in sorted(set(meta["inputs"]) | set(self.inputs))
                        if meta["inputs"].get(k) != self.inputs.get(k)]
        if differences and not self.force:
            raise ResumeError(f"{self.stage}: the saved state in {states[-1]} belongs to another run: "
                              f"{'; '.join(differences)}. Rerun with the same settings, or --resume never to start "
                              f"over, or --resume_force to continue anyway")
        if differences:
            say(f"[{self.stage}] resume_force: continuing despite {'; '.join(differences)}")
        return states[-1]

    def resume(self, modules: dict[str, torch.nn.Module], optimizer, scheduler) -> tuple[int, dict[str, Any]]:
        """Load the latest state into the live objects → (steps done, the stage's extra values); (0, {}) when
        there is none to resume."""
        folder = self.latest()
        if folder is None:
            return 0, {}
        if (folder / "dcp").is_dir():
            return self._resume_sharded(folder, modules, optimizer, scheduler)
        if _sharded(modules):
            raise SettingError(f"resume: {folder} was saved by one process without FSDP, and this run has "
                               f"{world_size()} processes (or FSDP); resume it in one process with fsdp: false, or "
                               f"pass --resume never to start over")
        from safetensors.torch import load_model

        for name, module in modules.items():
            load_model(module, str(folder / "model" / f"{name}.safetensors"), strict=True)
        trainer = torch.load(folder / "trainer.pt", weights_only=False)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        _set_rng_states(trainer["rng"])
        say(f"[{self.stage}] resuming from {folder} (after {trainer['step']} steps)")
        return int(trainer["step"]), trainer["extra"]

    def _resume_sharded(self, folder: Path, modules: dict[str, torch.nn.Module], optimizer,
                        scheduler) -> tuple[int, dict[str, Any]]:
        """Load a DCP state into this run's modules and optimiser, however many processes wrote it and however many
        read it (DCP reshards on load); each process takes back its own RNGs when the numbers of processes match,
        else rank 0's of the saved run (a different split samples differently anyway)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        every = torch.nn.ModuleDict(modules)  # one module over all: the optimiser's parameters are named from it
        model_state, optimizer_state = get_state_dict(every, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(every, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        trainer = torch.load(folder / "trainer.pt", weights_only=False)
        scheduler.load_state_dict(trainer["scheduler"])
        saved_by = json.loads((folder / "meta.json").read_text()).get("processes", 1)
        mine = folder / f"rng-rank{distributed.rank()}.pt"
        _set_rng_states(torch.load(mine if saved_by == world_size() else folder / "rng-rank0.pt", weights_only=False))
        say(f"[{self.stage}] resuming from {folder} (after {trainer['step']} steps; saved by {saved_by} process"
            f"{'es' if saved_by > 1 else ''}, resumed by {world_size()})")
        return int(trainer["step"]), trainer["extra"]

    # --- saving -----------------------------------------------------------------------------------------
    def due(self, steps_done: int) -> bool:
        return self.save_every > 0 and steps_done % self.save_every == 0

    def save(self, steps_done: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
             extra: dict[str, Any]) -> Path:
        """Write the state after `steps_done` steps into a temp folder, rename it in, drop all but the last
        `keep_last`."""
        if _sharded(modules):
            return self._save_sharded(steps_done, modules, optimizer, scheduler, extra)
        from safetensors.torch import save_model

        from rlhf.guard import nonfinite_tensors

        for name, module in modules.items():
            bad = nonfinite_tensors(module.state_dict().items())
            if bad:
                raise ValueError(f"{self.stage}: refusing to save a state whose {name} holds NaN or Inf ({bad[0]})")
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"step-{steps_done:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.folder))
        try:
            (tmp / "model").mkdir()
            for name, module in modules.items():
                save_model(module, str(tmp / "model" / f"{name}.safetensors"))
            torch.save({"step": steps_done, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": _rng_states(), "extra": extra}, tmp / "trainer.pt")
            (tmp / "meta.json").write_text(json.dumps({"stage": self.stage, "step": steps_done, "config": self.config,
                                                       "inputs": self.inputs}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"{self.stage}: cannot save the training state in {self.folder}: {e.strerror or e}; "
                             f"the previous state is intact") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.saved()[:-max(1, self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        self.last_saved = final
        return final

    def _save_sharded(self, steps_done: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                      extra: dict[str, Any]) -> Path:
        """`save` with the weights and optimiser sharded: every process writes its own shards (DCP) into one temp
        folder, which rank 0 renames in once all have written. Every process must call it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from rlhf.guard import nonfinite_tensors

        bad = [f"{name}: {found[0]}" for name, module in modules.items()
               if (found := nonfinite_tensors(_local(module.state_dict()).items()))]
        if not distributed.all_agree(not bad):  # no process writes when any holds a NaN
            raise ValueError(f"{self.stage}: refusing to save a state that holds NaN or Inf "
                             f"({bad[0] if bad else 'on another process'})")
        final = self.folder / f"step-{steps_done:06d}"
        tmp = self.folder / f".{final.name}.tmp-dcp"  # one name every process knows
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        try:
            model_state, optimizer_state = get_state_dict(torch.nn.ModuleDict(modules), optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "dcp"))
            torch.save(_rng_states(), tmp / f"rng-rank{distributed.rank()}.pt")
            if is_main():
                torch.save({"step": steps_done, "scheduler": scheduler.state_dict(), "extra": extra},
                           tmp / "trainer.pt")
                (tmp / "meta.json").write_text(json.dumps({"stage": self.stage, "step": steps_done,
                                                           "processes": world_size(), "config": self.config,
                                                           "inputs": self.inputs}, indent=2))
            distributed.barrier()
            if is_main():
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for old in self.saved()[:-max(1, self.keep_last)]:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise ValueError(f"{self.stage}: cannot save the training state in {self.folder}: {e.strerror or e}; "
                             f"the previous state is intact") from None
        distributed.barrier()
        self.last_saved = final
        return final

    def finished(self) -> None:
        """The stage's checkpoint is written: its training state is no longer needed (rank 0 removes it)."""
        if is_main():
            shutil.rmtree(self.folder, ignore_errors=True)

    # --- SIGTERM / SIGINT -------------------------------------------------------------------------------
    def watch_signals(self) -> None:
        """From here on SIGTERM and SIGINT only set a flag, which the loop reads after each step. The handlers are
        released by `release_signals`, or when this object is dropped (a stage that ended in an exception)."""
        import threading
        import weakref

        if threading.current_thread() is not threading.main_thread():
            return
        me = weakref.ref(self)  # the handler must not keep a finished stage's state alive

        def handler(number, frame):
            state = me()
            if state is not None:
                state.signal_number = number
            else:  # the stage is gone: behave as if it had never been installed
                signal.default_int_handler(number, frame) if number == signal.SIGINT else os._exit(128 + number)

        for number in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[number] = signal.signal(number, handler)
        self._handler = handler
        self._finalizer = weakref.finalize(self, _restore_handlers, dict(self._old_handlers), handler)

    def release_signals(self) -> None:
        if self._old_handlers:
            self._finalizer.detach()
            _restore_handlers(self._old_handlers, self._handler)
        self._old_handlers = {}

    def stop_if_asked(self, steps_done: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                      extra: dict[str, Any]) -> None:
        """After a step: when a signal came, save the state (unless this step's was just saved) and stop. Under
        torchrun every process calls this after every step and they agree (one small collective): a signal that
        reached any of them stops all of them at the same step, each saving its shards."""
        if distributed.all_agree(self.signal_number is None):
            return
        number = self.signal_number or signal.SIGTERM  # a process the signal did not reach stops with the others
        folder = self.folder / f"step-{steps_done:06d}"
        if not (folder / "meta.json").is_file():
            folder = self.save(steps_done, modules, optimizer, scheduler, extra)
        self.release_signals()
        raise StageInterrupted(self.stage, number, steps_done, folder)


def _restore_handlers(handlers: dict[int, Any], ours: Any) -> None:
    """Put back the handlers that were there before, where ours is still the one installed."""
    import threading

    if threading.current_thread() is threading.main_thread():
        for number, old in handlers.items():
            if signal.getsignal(number) is ours:
                signal.signal(number, old)


def trim_metrics(log_dir: Path, steps_done: int) -> None:
    """A resumed run logs again from step `steps_done`: drop the rows a killed run wrote after its last saved state,
    so the metrics read as one run. Rank 0 only (it alone logs), before anything is logged."""
    file = Path(log_dir) / "metrics.jsonl"
    if not is_main() or not file.is_file():
        return
    lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
    def step_of(line: str) -> int:
        try:
            return int(json.loads(line).get("step", -1))
        except (ValueError, AttributeError):
            return steps_done  # a line half-written by the kill goes too

    while lines and step_of(lines[-1]) >= steps_done:
        lines.pop()
    file.write_text("".join(lines), encoding="utf-8")
