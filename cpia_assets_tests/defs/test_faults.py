"""A partition run killed with SIGKILL in the middle of tiling, then rerun: no partial or
staging files, no duplicate rows, and the same files and manifest rows as an uninterrupted run.
Written against the asset behaviour (files and records), not the tiling internals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from cpia_assets.definitions import PARTITIONED_ASSETS
from cpia_assets.defs.instance import prepare_instance
from cpia_assets_tests.support.outputs import (
    OUTPUT_FOLDERS,
    build_partition,
    output_files,
    partition_records,
)

KEY = "wsi-20x"  # two small synthetic slides of the test catalog


def _materialize(env: dict[str, str]) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "dagster", "asset", "materialize", "-m", "cpia_assets.definitions",
        "--select", ",".join(PARTITIONED_ASSETS), "--partition", KEY,
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _kill_when_tiles_appear(run: subprocess.Popen, tiles: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if any(tiles.rglob("*.jpg")):
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            return
        time.sleep(0.02)
    raise AssertionError(f"no tile appeared under {tiles} (run exit code {run.poll()})")


def test_sigkill_during_tiling_then_rerun_gives_the_uninterrupted_result(
    small_catalog_path: Path, tmp_path: Path
) -> None:
    build_partition(small_catalog_path, tmp_path / "reference", KEY, workers=1)
    data = tmp_path / "killed"
    env = {**os.environ, "CPIA_CATALOG": str(small_catalog_path), "CPIA_DATA_DIR": str(data),
           "DAGSTER_HOME": str(tmp_path / "home"), "CPIA_WORKERS": "1"}  # fmt: skip
    prepare_instance(tmp_path / "home")

    _kill_when_tiles_appear(_materialize(env), data / "cpia")
    assert not (data / "manifests" / KEY / "tiles.parquet").exists()  # killed mid-tiling
    assert _materialize(env).wait(timeout=600) == 0

    left_over = [
        p for folder in (*OUTPUT_FOLDERS, "manifests") for p in (data / folder).rglob(".*")
    ]
    assert left_over == []  # no staging or temporary file survives the rerun
    tiles = pl.read_parquet(data / "manifests" / KEY / "tiles.parquet")
    assert tiles.height == tiles["path"].n_unique() > 0
    assert output_files(data) == output_files(tmp_path / "reference")
    reference = partition_records(tmp_path / "reference", KEY)
    rerun = partition_records(data, KEY)
    assert set(rerun) == set(reference)
    for table, frame in reference.items():
        assert rerun[table].equals(frame), table
