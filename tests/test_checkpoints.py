"""Checkpoint folders under kills and full disks: replacing one leaves the old or the new at the visible path at every
instant, killed saves leave no temp folders behind for long, and a folder that cannot be written is a clear error."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from rlhf import models
from rlhf.models import check_writable, recover_checkpoint, save_atomic

# In the child: replace `out` (holding {"v": 1}) with {"v": 2}, SIGKILLed right after the old folder was renamed
# aside, before the new one is renamed in: the worst instant of the replacement.
KILL_BETWEEN_RENAMES = """
import os, signal, sys
from rlhf import models
real, calls = os.replace, []
def replace(src, dst):
    real(src, dst)
    calls.append(1)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
models.os.replace = replace
models.save_atomic(sys.argv[1], json_files={"a.json": {"v": 2}})
"""


def test_a_kill_between_the_renames_leaves_the_old_checkpoint_recoverable(tmp_path):
    out = tmp_path / "ckpt"
    save_atomic(out, json_files={"a.json": {"v": 1}})
    result = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out)], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()  # the instant the kill left behind: old aside, new still in its temp folder
    assert len(list(tmp_path.glob(".ckpt.old-*"))) == 1 and len(list(tmp_path.glob(".ckpt.tmp-*"))) == 1
    recover_checkpoint(out)  # what the next load (resolve_model_path) or save does first
    assert json.loads((out / "a.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the stale temp folder is gone too


def test_ctrl_c_between_the_renames_puts_the_old_one_back(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    save_atomic(out, json_files={"a.json": {"v": 1}})
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(1)
        if len(calls) == 2:  # the new folder's rename: Ctrl-C arrives just before it
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(models.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(out, json_files={"a.json": {"v": 2}})
    monkeypatch.undo()
    assert json.loads((out / "a.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_next_save_removes_temp_folders_of_killed_saves(tmp_path):
    (tmp_path / ".ckpt.tmp-abc123").mkdir()
    (tmp_path / ".ckpt.tmp-abc123" / "model.safetensors").write_text("half")
    (tmp_path / ".other.tmp-x").mkdir()  # another checkpoint's: not ours to remove
    save_atomic(tmp_path / "ckpt", json_files={"a.json": {"v": 1}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", "ckpt"]


def test_a_full_disk_is_a_clear_error_and_keeps_the_old_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    save_atomic(out, json_files={"a.json": {"v": 1}})

    class FullDisk:
        def save_pretrained(self, folder, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ValueError, match="cannot save .*ckpt: No space left on device .*previous checkpoint.* intact"):
        save_atomic(out, model=FullDisk())
    assert json.loads((out / "a.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_unwritable_output_folder_fails_before_training(tmp_path, monkeypatch):
    check_writable(tmp_path / "a" / "b")  # creates the parent
    assert (tmp_path / "a").is_dir() and list((tmp_path / "a").iterdir()) == []

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(models.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"output_dir: cannot write in .*a \(Permission denied\)"):
        check_writable(tmp_path / "a" / "b")
