"""Partition locks (`core/locks.py`) with real processes: one holder at a time, waiters that
say who holds it, a SIGKILLed holder's lock taken over at once, a silent other host's after its
heartbeat stops; and temporaries that vanish under a writer fail it (`fsutil.atomic_path`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from cpia_assets.core.fsutil import OutputLostError, OutputWriteError, atomic_path
from cpia_assets.core.locks import (
    Holder,
    LockBusy,
    LockLost,
    exclusive,
    owner_file,
    partition_lock,
    read_holder,
    start_time,
)
from cpia_assets_tests.support.processes import LOCK_HOLDER as HOLD
from cpia_assets_tests.support.processes import start_until_ready


def test_a_second_holder_fails_at_once_or_waits_naming_the_holder(tmp_path: Path) -> None:
    lock = partition_lock(tmp_path, "p1")
    holder = start_until_ready(HOLD, str(lock))
    try:
        busy = rf"held by run run-A \(step hold, process {holder.pid} "
        with pytest.raises(LockBusy, match=busy), exclusive(lock, when_busy="fail"):
            pass
        events: list[str] = []
        threading.Timer(1.0, holder.communicate, args=("",)).start()  # lets go after 1 s
        started = time.monotonic()
        with exclusive(lock, run_id="run-B", on_event=events.append):
            waited = time.monotonic() - started
            assert read_holder(lock).run_id == "run-B"
        assert waited >= 0.9
        assert len(events) == 1 and events[0].startswith(
            f"waiting for run run-A (step hold, process {holder.pid} on "
        )
    finally:
        holder.kill()
        holder.wait()
    assert not owner_file(lock).exists()  # released


def test_other_partitions_do_not_wait(tmp_path: Path) -> None:
    holder = start_until_ready(HOLD, str(partition_lock(tmp_path, "p1")))
    try:
        with exclusive(partition_lock(tmp_path, "p2"), when_busy="fail"):
            pass
    finally:
        holder.communicate("")


def test_a_sigkilled_holders_lock_is_taken_over_at_once(tmp_path: Path) -> None:
    lock = partition_lock(tmp_path, "p1")
    holder = start_until_ready(HOLD, str(lock))
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert read_holder(lock).pid == holder.pid  # its record is left behind
    events: list[str] = []
    started = time.monotonic()
    with exclusive(lock, run_id="run-B", when_busy="fail", on_event=events.append):
        assert time.monotonic() - started < 2  # 1 s for its workers to die (`die_with_owner`)
    (event,) = events
    assert event.startswith(f"took over the lock of run run-A (step hold, process {holder.pid} ")
    assert "its process is gone" in event


def _other_host_record(lock: Path) -> Holder:
    """A record as a process on another host (sharing the data folder) leaves it."""
    other = replace(Holder.me("run-R", "step remote"), host="elsewhere", machine="x", pid=1)
    lock.parent.mkdir(parents=True, exist_ok=True)
    owner_file(lock).write_text(json.dumps(asdict(other)))
    return other


def test_another_hosts_holder_is_waited_for_while_its_heartbeat_moves(tmp_path: Path) -> None:
    lock = partition_lock(tmp_path, "p1")
    _other_host_record(lock)
    beating = threading.Event()

    def heartbeat() -> None:
        while not beating.wait(0.1):
            os.utime(owner_file(lock))

    threading.Thread(target=heartbeat, daemon=True).start()
    events: list[str] = []
    try:
        busy = r"held by run run-R .*process 1 on elsewhere"
        with pytest.raises(LockBusy, match=busy), exclusive(lock, when_busy="fail"):
            pass
        threading.Timer(1.5, beating.set).start()  # the other host stops beating after 1.5 s
        started = time.monotonic()
        with exclusive(lock, stale_after_s=0.5, on_event=events.append, poll_s=0.05):
            waited = time.monotonic() - started
    finally:
        beating.set()
    assert 1.5 <= waited < 3, waited  # alive while it beat, taken over 0.5 s after it stopped
    assert events[0].startswith("waiting for run run-R (step remote, process 1 on elsewhere")
    assert events[-1].startswith("took over the lock of run run-R")
    assert "heartbeat stopped" in events[-1]


def test_a_holder_whose_lock_was_taken_over_fails_at_release(tmp_path: Path) -> None:
    lock = partition_lock(tmp_path, "p1")
    lost = r"taken over while held .*run run-R"
    with pytest.raises(LockLost, match=lost), exclusive(lock, heartbeat_s=0.05):
        owner_file(lock).unlink()
        _other_host_record(lock)  # e.g. this host froze past another's stale_after_s
        time.sleep(0.2)
    assert read_holder(lock).run_id == "run-R"  # the new holder's record is left alone


def test_a_temporary_that_vanishes_fails_the_writer_not_the_input(tmp_path: Path) -> None:
    final = tmp_path / "out" / "slide.tiff"
    lost = "vanished while it was written"
    with pytest.raises(OutputLostError, match=lost) as raised, atomic_path(final) as tmp:
        tmp.write_bytes(b"x")
        shutil.rmtree(tmp.parent)  # what another build's clean-up did
        raise RuntimeError("libvips: write error")  # whatever the writer makes of it
    assert isinstance(raised.value, OutputWriteError)
    assert str(final) in str(raised.value) and "internal error while writing" in str(raised.value)
    lost = "vanished before it was renamed into place"
    with pytest.raises(OutputLostError, match=lost), atomic_path(final) as tmp:
        shutil.rmtree(tmp.parent)
    assert not final.exists()


OWNER_WITH_A_WORKER = """import sys
from cpia_assets.core.parallel import local_pool
from cpia_assets_tests.core.test_locks import busy_worker
with local_pool(1) as pool:
    pool.submit(busy_worker, sys.argv[1]).result()
"""


def busy_worker(pid_file: str) -> None:
    """A pool worker in the middle of a long job (a slide, an ROI batch, a Mini crop) of the
    build that started it."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)


def test_a_killed_builds_pool_workers_die_with_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    owner = subprocess.Popen([sys.executable, "-c", OWNER_WITH_A_WORKER, str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and owner.poll() is None
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        os.kill(owner.pid, signal.SIGKILL)  # the build dies; its worker is mid-slide
        owner.wait()
        deadline = time.monotonic() + 5
        while start_time(worker) is not None:
            assert time.monotonic() < deadline, "the worker outlived its build"
            time.sleep(0.1)
    finally:
        owner.kill()
        owner.wait()
