"""Run folder locks and training processes tied to their owner, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cpia_assets.core.locks import start_time
from cpia_assets.core.training.ssl.runlock import (
    LOCK_FILE,
    OWNER_ENV,
    RunFolderBusy,
    run_lock,
)

HOLD = """import sys, time
from pathlib import Path
from cpia_assets.core.training.ssl.runlock import {0}
with {0}(Path(sys.argv[1])):
    print("ready", flush=True)
    time.sleep(600)
"""


def _start(tmp_path: Path, holder: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD.format(holder), str(tmp_path)],
                               stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def test_a_run_folder_has_one_live_holder_and_a_dead_ones_lock_is_taken_over(
    tmp_path: Path,
) -> None:
    holder = _start(tmp_path, "run_lock")
    try:
        busy = rf"another training .* \(pid {holder.pid}\)"
        with pytest.raises(RunFolderBusy, match=busy), run_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind
    with run_lock(tmp_path):  # its process is gone: the lock is stale
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_training_process_dies_with_its_owner_while_its_parent_lives(tmp_path: Path) -> None:
    """A torchrun rank: its parent (here the test) outlives the asset process that owns it."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    env = {**os.environ, OWNER_ENV: f"{owner.pid}:{start_time(owner.pid)}"}
    rank = _start(tmp_path, "training_process", env)
    try:
        assert json.loads((tmp_path / f"{LOCK_FILE}.{rank.pid}").read_text())["pid"] == rank.pid
        with pytest.raises(RunFolderBusy, match=rf"\(pid {rank.pid}\)"), run_lock(tmp_path):
            pass  # the registered training process holds the folder too
        owner.kill()
        owner.wait()
        assert rank.wait(timeout=5) == -signal.SIGKILL
    finally:
        owner.kill()
        rank.kill()
        rank.wait()
    with run_lock(tmp_path):  # both stale now
        pass
