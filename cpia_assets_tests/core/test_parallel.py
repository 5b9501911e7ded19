"""Work over real spawn process pools whose workers really get SIGKILLed."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import dask
import pytest
from distributed import Client, LocalCluster

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slide_jobs import standardize_partition
from cpia_assets_tests.support.slide_factory import build_40x_slide


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


def _number_and_cause(item: tuple[int, str], cause: str) -> tuple[int, str]:
    return item[0], cause


def _raise_value_error(number: int) -> int:
    raise ValueError(f"bad item {number}")


def _pool(workers: int = 2) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))


def test_a_killed_worker_loses_only_the_item_that_kills_it_again(tmp_path: Path) -> None:
    marker = tmp_path / "kill.txt"
    marker.write_text("5")  # 5 kills every worker it runs in; 3 only its first one
    items = [(number, str(marker)) for number in range(8)]
    with _pool() as pool:
        results = list(map_unordered(_square_or_die, items, pool, on_lost=_number_and_cause))
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


_OOM_KILLER = """\
import os, signal, sys

DOOMED = os.environ.get("CPIA_TEST_DOOMED")
LOG = os.environ.get("CPIA_TEST_KILLED_LOG")


def _kill_on_open(event, args):
    if event == "open" and DOOMED and str(args[0]) == DOOMED:
        with open(LOG, "a") as log:
            log.write(f"{os.getpid()}\\n")
        os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(_kill_on_open)
"""


@contextlib.contextmanager
def _oom_killer(doomed: Path, tmp_path: Path) -> Iterator[Path]:
    """Like the kernel's OOM killer, but deterministic: every worker process started inside
    this block (spawned interpreters load the `sitecustomize` put on their path) SIGKILLs
    itself the moment it opens `doomed`, after logging its PID to the returned file."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_OOM_KILLER)
    log = tmp_path / "killed.log"
    log.touch()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
        env.setenv("CPIA_TEST_DOOMED", str(doomed))
        env.setenv("CPIA_TEST_KILLED_LOG", str(log))
        yield log


def test_standardize_records_a_slide_whose_worker_is_killed_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    layout = DataLayout(tmp_path / "data")
    raw = layout.raw_dir("wsi-test")
    slides = [build_40x_slide(raw / f"S40-000{n}.tiff", 2400) for n in range(1, 5)]
    doomed = slides[1]
    with _oom_killer(doomed, tmp_path) as killed, _pool() as pool:
        result = standardize_partition(
            slides,
            key="wsi-test",
            layout=layout,
            options=WsiOptions(),
            settings=StandardizeSettings(),
            executor=pool,
        )
    assert len(set(killed.read_text().split())) == 2  # the pool's worker, then the retry's
    (row,) = result.failures
    assert row == {
        "file": "raw/wsi-test/S40-0002.tiff",
        "stage": "standardized_wsi",
        "reason": "S40-0002.tiff: worker died: signal 9, possibly out of memory",
    }
    assert sorted(Path(r["standardized_file"]).name for r in result.records) == [
        "S40-0001.tiff",
        "S40-0003.tiff",
        "S40-0004.tiff",
    ]
    outputs = sorted(p.name for p in layout.standardized_dir("wsi-test").iterdir())
    assert outputs == ["S40-0001.tiff", "S40-0003.tiff", "S40-0004.tiff"]  # no temporaries


def test_on_a_dask_cluster_only_the_item_whose_workers_all_die_is_lost(tmp_path: Path) -> None:
    marker = tmp_path / "kill.txt"
    marker.write_text("5")
    items = [(number, str(marker)) for number in range(8)]
    # One task per worker thread at a time (no tasks queued on a worker), so a worker's death
    # makes only the item it was running suspicious, not an innocent one queued behind it.
    retry_once = {
        "distributed.scheduler.allowed-failures": 1,
        "distributed.scheduler.worker-saturation": 1.0,
    }
    with (
        dask.config.set(retry_once),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        executor = client.get_executor()
        results = list(map_unordered(_square_or_die, items, executor, on_lost=_number_and_cause))
    lost = [result for result in results if isinstance(result, tuple)]
    assert lost == [(5, "worker died: every Dask worker that ran it died, possibly out of memory")]
    squares = sorted(result for result in results if isinstance(result, int))
    assert squares == [number * number for number in range(8) if number != 5]
