"""Long-running Dagster processes started by tests, always stopped with their children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

LOCK_HOLDER = """import sys
from pathlib import Path
from cpia_assets.core.locks import exclusive
with exclusive(Path(sys.argv[1]), run_id="run-A", what="step hold"):
    print("ready", flush=True)
    sys.stdin.read()
"""
"""Holds the lock file argv[1] as run `run-A` until its stdin closes (`start_until_ready`)."""


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group started with `start_new_session=True`; SIGKILL after 30 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_until_ready(script: str, *args: str) -> subprocess.Popen[str]:
    """Run `python -c script args` and return once it prints `ready` (its stdin stays open:
    the script may wait on it)."""
    process = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process
