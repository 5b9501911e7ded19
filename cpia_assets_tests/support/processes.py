"""Long-running Dagster processes started by tests, always stopped with their children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


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
