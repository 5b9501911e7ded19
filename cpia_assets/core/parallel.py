"""Run per-item work over an executor: local processes, a Dask cluster, or in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, as_completed
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_unordered(
    function: Callable[[T], R], items: Iterable[T], executor: Executor | None = None
) -> Iterator[R]:
    """Yield `function(item)` for every item as each finishes.

    `executor=None` runs in this process (tests, debugging). With a process pool or Dask's
    `Client.get_executor()`, `function` and items must be picklable: pass paths, not open slides.
    Exceptions propagate; per-item error handling belongs inside `function`.
    """
    if executor is None:
        for item in items:
            yield function(item)
        return
    futures = [executor.submit(function, item) for item in items]
    for future in as_completed(futures):
        yield future.result()
