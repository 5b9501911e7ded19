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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

LOCK_FILE = ".lock"
OWNER_ENV = "CPIA_TRAINING_OWNER"
"""`pid:start time` of the process a training process must not outlive (set by the asset)."""
_PR_SET_PDEATHSIG = 1


class RunFolderBusy(RuntimeError):
    """Another live process trains in this run folder."""


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), None when it is not running (no
    such process, or a zombie: dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # from field 3 on; the name may hold spaces
    return None if fields[0] == "Z" else int(fields[19])


def identity(pid: int | None = None) -> dict[str, int | None]:
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": start_time(pid)}


def owner_token() -> str:
    """This process as the `OWNER_ENV` value of the training processes it starts."""
    return f"{os.getpid()}:{start_time(os.getpid())}"


def _holder(path: Path) -> dict | None:
    """The live process a lock file names, None when the file is gone or stale."""
    try:
        holder = json.loads(path.read_text())
        started = start_time(int(holder["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return holder if started is not None and started == holder["start"] else None


def _write_new(path: Path, record: dict) -> bool:
    """Create `path` holding `record` in one step; False when it exists already."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)  # fails when `path` exists; readers never see it half-written
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold the run folder for this process; RunFolderBusy names a live holder or a training
    process still registered there."""
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / LOCK_FILE, identity()

    def registered() -> list[Path]:
        return list(folder.glob(f"{LOCK_FILE}.*[0-9]"))

    while not _write_new(path, me):
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
        pid, start = (int(part) for part in owner.split(":"))
        threading.Thread(target=_watch, args=(pid, start), daemon=True).start()
    path = folder / f"{LOCK_FILE}.{os.getpid()}"
    path.write_text(json.dumps(identity()))
    try:
        yield
    finally:
        with suppress(OSError):
            path.unlink()


def _watch(pid: int, start: int, every_s: float = 0.5) -> None:
    while start_time(pid) == start:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGKILL)  # its run is gone: nothing may be left training
