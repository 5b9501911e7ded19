"""Run per-item work over an executor: local processes, a Dask cluster, or in-process.

Local worker processes (`local_pool`, and the fresh processes of retries) die with the process
that started them: once a killed build's partition lock is taken over, none of its workers may
go on writing (or removing temporaries) there.

A local worker process that dies (killed for memory, SIGKILL, a crash in a C library) breaks
the whole `ProcessPoolExecutor`: every item still pending fails with `BrokenProcessPool`, and
nothing says which item killed it. `map_unordered` therefore runs each lost item once more,
alone in a fresh process, so that only the item that kills its worker again is lost. A Dask
cluster retries an item whose worker died by itself and then fails only that item.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar

from cpia_assets.core.locks import die_with_owner, owner_token

T = TypeVar("T")
R = TypeVar("R")


def local_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes that die (SIGKILL) as soon as this process is gone.
    Spawned: forking a process that holds Dagster's threads and OpenSlide handles is unsafe."""
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"),
        initializer=die_with_owner, initargs=(owner_token(),),
    )  # fmt: skip


def map_unordered(
    function: Callable[[T], R],
    items: Iterable[T],
    executor: Executor | None = None,
    *,
    on_lost: Callable[[T, str], R] | None = None,
) -> Iterator[R]:
    """Yield `function(item)` for every item as each finishes.

    `executor=None` runs in this process (tests, debugging). With a process pool or Dask's
    `Client.get_executor()`, `function` and items must be picklable: pass paths, not open slides.
    Exceptions propagate (and cancel the items not started); per-item error handling belongs
    inside `function`. Items lost with a dead pool worker are retried once, each alone in a
    fresh process (at most as many at a time as the pool has workers); an item whose retry
    dies too yields `on_lost(item, cause)`, e.g. "worker died: signal 9, possibly out of
    memory"; so does an item that Dask gave up on (`KilledWorker`). Without `on_lost` the
    `BrokenProcessPool` or `KilledWorker` propagates.
    """
    if executor is None:
        for item in items:
            yield function(item)
        return
    pending = list(items)
    futures: dict[Future[R], T] = {}
    lost: list[T] = []
    try:
        for index, item in enumerate(pending):
            try:
                futures[executor.submit(function, item)] = item
            except BrokenProcessPool:  # an item already submitted has broken the pool
                lost.extend(pending[index:])
                break
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                lost.append(futures[future])
                continue
            except Exception as exc:
                if on_lost is None or not _killed_dask_workers(exc):
                    raise
                result = on_lost(futures[future], _DASK_WORKERS_DIED)
            yield result
    finally:
        for future in futures:
            future.cancel()
    if lost and on_lost is None:
        raise BrokenProcessPool(f"a worker died; {len(lost)} items lost")
    if lost:
        yield from _retry_alone(function, lost, on_lost, workers=_pool_size(executor))


_DASK_WORKERS_DIED = "worker died: every Dask worker that ran it died, possibly out of memory"


def _killed_dask_workers(exc: BaseException) -> bool:
    """Dask's `KilledWorker`: the scheduler already retried the item on fresh workers (up to
    `distributed.scheduler.allowed-failures`) and every one of them died."""
    distributed = sys.modules.get("distributed")  # not imported: no Dask executor in use
    return distributed is not None and isinstance(exc, distributed.KilledWorker)


def _pool_size(executor: Executor) -> int:
    # ProcessPoolExecutor keeps its size private; retries must not run more processes at
    # once than the pool was sized for (memory was the likely cause of the loss).
    return max(1, getattr(executor, "_max_workers", 1))


@dataclass(frozen=True)
class _Retried(Generic[R]):
    value: R | None = None
    error: BaseException | None = None
    cause: str | None = None  # set when the fresh process died too


def _retry_alone(
    function: Callable[[T], R], items: list[T], on_lost: Callable[[T, str], R], *, workers: int
) -> Iterator[R]:
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as threads:
        futures = {threads.submit(_run_in_fresh_process, function, item): item for item in items}
        for future in as_completed(futures):
            retried = future.result()
            if retried.error is not None:
                raise retried.error
            if retried.cause is not None:
                yield on_lost(futures[future], retried.cause)
            else:
                yield retried.value  # type: ignore[misc]


def _run_in_fresh_process(function: Callable[[T], R], item: T) -> _Retried[R]:
    context = get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child, args=(function, item, sender, owner_token()), daemon=True
    )
    process.start()
    sender.close()
    try:
        succeeded, value = receiver.recv()
    except EOFError:  # the process died before it could answer
        process.join()
        return _Retried(cause=_death_cause(process.exitcode))
    finally:
        receiver.close()
    process.join()
    return _Retried(value=value) if succeeded else _Retried(error=value)


def _child(function: Callable[[Any], Any], item: Any, sender: Connection, owner: str) -> None:
    die_with_owner(owner)
    try:
        answer = (True, function(item))
    except Exception as exc:  # re-raised in the parent, as a pool would
        answer = (False, exc)
    sender.send(answer)
    sender.close()


def _death_cause(exitcode: int | None) -> str:
    """Why a worker process ended without an answer, from its exit code (-N: signal N)."""
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        hint = ", possibly out of memory" if number == signal.SIGKILL else ""
        return f"worker died: signal {number}{hint}"
    return f"worker died: exit code {exitcode}"
