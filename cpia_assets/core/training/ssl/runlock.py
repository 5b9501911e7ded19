"""One training per run folder at a time, and training processes that die with their owner.

The process that starts a training (the Dagster asset) takes `.lock` in the run folder before it
touches anything there; the training processes it starts register beside it (`.lock.<pid>`). Each
file records a pid and that process's start time, so a file left by a dead process (or by a pid
reused since) is stale and is taken over. Linux only (/proc), like the training stack itself."""

from __future__ import annotations

import ctypes
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from cpia_assets.core.locks import die_with_owner, identity, start_time, write_new

__all__ = [
    "LOCK_FILE",
    "OWNER_ENV",
    "RunFolderBusy",
    "run_lock",
    "training_process",
]

LOCK_FILE = ".lock"
OWNER_ENV = "CPIA_TRAINING_OWNER"
"""`pid:start time` of the process a training process must not outlive (set by the asset)."""
_PR_SET_PDEATHSIG = 1


class RunFolderBusy(RuntimeError):
    """Another live process trains in this run folder."""


def _holder(path: Path) -> dict | None:
    """The live process a lock file names, None when the file is gone or stale."""
    try:
        holder = json.loads(path.read_text())
        started = start_time(int(holder["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return holder if started is not None and started == holder["start"] else None


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold the run folder for this process; RunFolderBusy names a live holder or a training
    process still registered there."""
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / LOCK_FILE, identity()

    def registered() -> list[Path]:
        return list(folder.glob(f"{LOCK_FILE}.*[0-9]"))

    while not write_new(path, json.dumps(me)):
        _refuse_if_live(folder, [path, *registered()])
        for stale in [path, *registered()]:
            stale.unlink(missing_ok=True)
    try:
        _refuse_if_live(folder, registered())  # e.g. the training of a killed owner, not yet dead
        yield
    finally:
        if _holder(path) == me:
            path.unlink()


def _refuse_if_live(folder: Path, lock_files: list[Path]) -> None:
    live = [holder for holder in map(_holder, lock_files) if holder]
    if live:
        raise RunFolderBusy(
            f"{folder}: another training is running in this folder (pid {live[0]['pid']}); "
            "wait for it or stop it"
        )


@contextmanager
def training_process(folder: Path) -> Iterator[None]:
    """Register this training process in its run folder and make it die with its owner: the
    parent's death signal (the direct child) and a watchdog on `OWNER_ENV` (torchrun's ranks, or
    a parent that was itself killed with SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    owner = os.environ.get(OWNER_ENV)
    if owner:
        die_with_owner(owner)
    path = folder / f"{LOCK_FILE}.{os.getpid()}"
    path.write_text(json.dumps(identity()))
    try:
        yield
    finally:
        with suppress(OSError):
            path.unlink()
