"""Exclusive locks on output folders, and the process identities they rest on.

`exclusive(path)` lets one process at a time write what the lock guards (a partition's outputs:
`partition_lock(root, key)`), on one host or across hosts that share the data folder. Two files:

- `<name>.lock`, never deleted: the holder `flock`s it. On one host the kernel drops the lock
  when its holder dies, and contenders queue on it, so two of them never take over the same
  dead holder's record at once. Over NFS `flock` may or may not reach other hosts; nothing
  below relies on it doing so.
- `<name>.owner`: the holder's record (host, process id and start time, run id, what it does,
  since when, a random token), created in one step (`os.link`, atomic over NFS too) and
  touched every `heartbeat_s` while held. It is the lock across hosts.

A record of this host (same host name, boot and pid namespace) is live while its process is:
a dead holder's record (SIGKILL, out of memory, power cut) is taken over at once. A record of
another host is live while its heartbeat moves: one whose modification time has not changed
for `stale_after_s`, as observed by the waiter's own clock (so clock skew between hosts does
not matter), is taken over. A holder whose record was taken over (its host froze for longer
than that) learns it at release: `LockLost`, so its step fails instead of reporting outputs
it may share with the new holder.

Limit: two hosts that decide within the same few milliseconds that one third host's record is
stale can both take it over when `flock` does not reach across hosts (NFS mounted `nolock`).

Also here: process identities (`start_time`, `identity`, `owner_token`) and `die_with_owner`,
which makes a helper process (a training process, a worker) kill itself once its owner is gone.
Linux only (/proc), like the rest of the platform's process handling.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

WhenBusy = Literal["wait", "fail"]
HEARTBEAT_S = 10.0
"""How often a holder touches its record."""
STALE_AFTER_S = 120.0
"""A record of another host whose heartbeat has not moved for this long is taken over."""
NOTICE_EVERY_S = 60.0
"""How often a waiter repeats who holds the lock."""
TAKEOVER_GRACE_S = 1.0
"""Pause before taking over a dead holder of this host: twice `die_with_owner`'s poll."""
LOCKS_DIR = "locks"
"""Folder of the lock files under the data folder."""


class LockBusy(RuntimeError):
    """The lock is held by a live holder and the caller would not wait (`when_busy="fail"`)."""

    def __init__(self, message: str, holder: Holder | None) -> None:
        super().__init__(message)
        self.holder = holder


class LockLost(RuntimeError):
    """Another process took over a lock while this one held it (its heartbeat stalled)."""


# -- process identities ---------------------------------------------------------------------


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
    """This process as `pid:start time`, for `die_with_owner` in the processes it starts."""
    return f"{os.getpid()}:{start_time(os.getpid())}"


def _machine() -> str:
    """What tells this host's processes from another's: boot and pid namespace (two containers
    with one host name do not share pids)."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(Path("/proc/self/ns/pid").readlink()))
    return "|".join(parts)


_watched: set[str] = set()
_watched_guard = threading.Lock()


def die_with_owner(token: str, every_s: float = 0.5) -> None:
    """Kill this process (SIGKILL) as soon as the process `token` (`owner_token`) is gone; a
    watchdog thread, started once per token. For helpers that must not outlive their owner."""
    with _watched_guard:
        if token in _watched:
            return
        _watched.add(token)
    pid, start = (int(part) for part in token.split(":"))
    threading.Thread(target=_watch, args=(pid, start, every_s), daemon=True).start()


def _watch(pid: int, start: int, every_s: float) -> None:
    while start_time(pid) == start:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGKILL)  # its owner is gone: nothing may be left writing


def write_new(path: Path, text: str) -> bool:
    """Create `path` holding `text` in one step; False when it exists already. Readers never see
    it half-written (a hard link of a complete temporary, atomic over NFS too)."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


# -- the lock --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """Who holds a lock (the `.owner` record)."""

    host: str
    pid: int
    start: int | None
    run_id: str
    what: str
    since: float
    token: str
    machine: str = ""

    @classmethod
    def me(cls, run_id: str = "", what: str = "") -> Holder:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            start=start_time(pid),
            run_id=run_id,
            what=what,
            since=time.time(),
            token=secrets.token_hex(8),
            machine=_machine(),
        )

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        run = f"run {self.run_id}" if self.run_id else "a process outside Dagster"
        what = f"{self.what}, " if self.what else ""
        return f"{run} ({what}process {self.pid} on {self.host}, since {when})"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname() and self.machine == _machine()

    def alive(self) -> bool:
        """Only for a holder `on_this_host`."""
        return self.start is not None and start_time(self.pid) == self.start


def partition_lock(root: Path, key: str) -> Path:
    """The lock of one partition's outputs under the data folder `root`."""
    return Path(root) / LOCKS_DIR / f"partition-{key}.lock"


def owner_file(path: Path) -> Path:
    return path.with_suffix(".owner")


def read_holder(path: Path) -> Holder | None:
    """The holder recorded for lock `path` (None when free or unreadable)."""
    try:
        return Holder(**json.loads(owner_file(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def exclusive(
    path: Path,
    *,
    run_id: str = "",
    what: str = "",
    when_busy: WhenBusy = "wait",
    on_event: Callable[[str], None] | None = None,
    stale_after_s: float = STALE_AFTER_S,
    heartbeat_s: float = HEARTBEAT_S,
    notice_every_s: float = NOTICE_EVERY_S,
    poll_s: float = 0.25,
) -> Iterator[Holder]:
    """Hold lock `path` (module docstring) for the block; yields this holder's record.

    A live holder is waited for (`when_busy="wait"`: `on_event` hears who it is at once, every
    `notice_every_s` and whenever another holder takes it) or refused at once (`"fail"`:
    `LockBusy` naming it). A dead holder's lock is taken over (`on_event` says whose).
    `LockLost` after the block when the lock was taken from this holder meanwhile."""
    if when_busy not in ("wait", "fail"):
        raise ValueError(f"when_busy must be 'wait' or 'fail', not {when_busy!r}")
    me = Holder.me(run_id, what)
    tell = on_event or (lambda message: None)
    held = _acquire(
        Path(path), me, when_busy, tell, stale_after_s, min(heartbeat_s, stale_after_s / 4),
        notice_every_s, poll_s,
    )  # fmt: skip
    try:
        yield me
    finally:
        lost = held.release()
    if lost:
        raise LockLost(f"{path}: {lost}")


class _Held:
    """A lock taken: its flock (when the file system has one) and the heartbeat thread."""

    def __init__(self, path: Path, fd: int, me: Holder, heartbeat_s: float) -> None:
        self.path, self.fd, self.me = path, fd, me
        self.lost = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        owner = owner_file(self.path)
        while not self._stop.wait(every_s):
            holder = read_holder(self.path)
            if holder is None or holder.token != self.me.token:
                now = holder.describe() if holder else "nobody"
                self.lost = f"the lock was taken over while held (now held by {now})"
                return
            with contextlib.suppress(OSError):
                os.utime(owner)  # no times given: an NFS server sets its own clock

    def release(self) -> str:
        self._stop.set()
        self._thread.join()
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.me.token:
            owner_file(self.path).unlink(missing_ok=True)
        elif not self.lost:
            now = holder.describe() if holder else "nobody"
            self.lost = f"the lock was taken over while held (now held by {now})"
        os.close(self.fd)  # drops the flock
        return self.lost


def _acquire(
    path: Path,
    me: Holder,
    when_busy: WhenBusy,
    tell: Callable[[str], None],
    stale_after_s: float,
    heartbeat_s: float,
    notice_every_s: float,
    poll_s: float,
) -> _Held:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    heartbeat = _Heartbeat(stale_after_s)
    next_notice, told = 0.0, ""
    try:
        while True:
            flocked = _try_flock(fd)
            if flocked:
                taken, holder = _claim(path, me, heartbeat, tell)
                if taken:
                    return _Held(path, fd, me, heartbeat_s)
                fcntl.flock(fd, fcntl.LOCK_UN)  # a live holder on another host: queue again
                who = holder.describe() if holder else "a holder whose record is unreadable"
            else:
                holder = read_holder(path)
                who = holder.describe() if holder else "a process of this host (taking it now)"
            if when_busy == "fail":
                raise LockBusy(f"{path.name}: held by {who}; not waiting (when_busy: fail)", holder)
            if time.monotonic() >= next_notice or (holder and holder.token != told):
                tell(f"waiting for {who} to finish with it ({path})")
                next_notice = time.monotonic() + notice_every_s
                told = holder.token if holder else told
            time.sleep(poll_s)
    except BaseException:
        os.close(fd)
        raise


def _try_flock(fd: int) -> bool:
    """True when this process now holds the flock, or the file system has none (then the
    records alone decide)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise
    return True


class _Heartbeat:
    """A waiter's view of a record of another host: stale once unchanged for `stale_after_s`."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.seen: tuple[str, int] | None = None
        self.since = time.monotonic()

    def stale(self, token: str, mtime_ns: int) -> bool:
        if (token, mtime_ns) != self.seen:
            self.seen, self.since = (token, mtime_ns), time.monotonic()
        return time.monotonic() - self.since >= self.stale_after_s


def _claim(
    path: Path, me: Holder, heartbeat: _Heartbeat, tell: Callable[[str], None]
) -> tuple[bool, Holder | None]:
    """With the flock held: write our record, or take over a dead holder's. (True, None) when
    the lock is ours, else (False, the live holder: of another host; None if unreadable)."""
    owner = owner_file(path)
    record = json.dumps(asdict(me))
    while not write_new(owner, record):
        try:
            mtime_ns = owner.stat().st_mtime_ns
        except FileNotFoundError:
            continue  # released meanwhile (another host): try again
        holder = read_holder(path)
        if holder is not None and holder.on_this_host():
            if holder.alive():
                return False, holder  # this file system has no flock: the record decides
            why = "its process is gone"
        elif not heartbeat.stale(holder.token if holder else "", mtime_ns):
            return False, holder
        else:
            why = f"its heartbeat stopped {heartbeat.stale_after_s:.0f} s ago"
        who = holder.describe() if holder else "an unreadable record"
        tell(f"took over the lock of {who}: {why} ({path})")
        if holder is not None and holder.on_this_host():
            time.sleep(TAKEOVER_GRACE_S)  # its workers' `die_with_owner` see it gone too
        owner.unlink(missing_ok=True)
    return True, None
