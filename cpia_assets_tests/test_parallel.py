"""map_unordered over a real spawn process pool whose workers really get SIGKILLed."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import pytest

from cpia_assets.core.parallel import map_unordered


def _square_or_die(item: tuple[int, str]) -> int:
    """Test-only work: SIGKILLs its own worker for the items named in the marker file."""
    number, marker = item
    killed = Path(marker)
    if str(number) in killed.read_text().split():
        os.kill(os.getpid(), signal.SIGKILL)
    if number == 3 and not killed.with_suffix(".retried").exists():
        killed.with_suffix(".retried").touch()  # 3 dies on its first run only
        os.kill(os.getpid(), signal.SIGKILL)
    return number * number


def _raise_value_error(number: int) -> int:
    raise ValueError(f"bad item {number}")


def _pool(workers: int = 2) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))


def test_a_killed_worker_loses_only_the_item_that_kills_it_again(tmp_path: Path) -> None:
    marker = tmp_path / "kill.txt"
    marker.write_text("5")  # 5 kills every worker it runs in; 3 only its first one
    items = [(number, str(marker)) for number in range(8)]
    with _pool() as pool:
        results = list(
            map_unordered(_square_or_die, items, pool, on_lost=lambda item, cause: (item[0], cause))
        )
    lost = [result for result in results if isinstance(result, tuple)]
    assert lost == [(5, "worker died: signal 9, possibly out of memory")]
    squares = sorted(result for result in results if isinstance(result, int))
    assert squares == [number * number for number in range(8) if number != 5]


def test_without_on_lost_a_dead_worker_fails_the_map(tmp_path: Path) -> None:
    marker = tmp_path / "kill.txt"
    marker.write_text("0 1 2")
    with _pool() as pool, pytest.raises(BrokenProcessPool):
        list(map_unordered(_square_or_die, [(n, str(marker)) for n in range(3)], pool))


def test_errors_of_the_work_propagate_and_are_not_retried() -> None:
    with _pool() as pool, pytest.raises(ValueError, match="bad item"):
        list(map_unordered(_raise_value_error, [1, 2], pool, on_lost=lambda item, cause: -1))
