"""Long-running Dagster processes started by tests, always stopped with their children."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group started with `start_new_session=True`; SIGKILL after 30 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
