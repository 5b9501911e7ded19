"""A real backfill under `dagster-daemon` on a temporary instance: the run queue, pools and
backfill tags as a user gets them with `make ui` or the README's commands, on SQLite and on
PostgreSQL instance storage (a real server, `support/postgres.py`). (Four partition runs
and the manifest at once from the CLI: `test_manifest.py`,
`test_partition_runs_beside_manifest_runs_lose_nothing`.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from cpia_assets.definitions import PARTITIONED_ASSETS
from cpia_assets.defs.automation import SENSOR_NAME
from cpia_assets.defs.instance import prepare_instance
from cpia_assets_tests.support.postgres import use_postgres
from cpia_assets_tests.support.processes import stop_process_group

KEYS = ("cells-a", "cells-b", "cells-c")
MAX_RUNS = 2
BIN = Path(sys.executable).parent
MODULE = ["-m", "cpia_assets.definitions"]


def _catalog(root: Path) -> Path:
    entries = []
    for index, key in enumerate(KEYS):
        folder = root / key
        folder.mkdir(parents=True)
        for image in range(2):
            rng = np.random.default_rng(10 * index + image)
            pixels = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"cell-{image}.png")
        entries.append(
            f"- {{key: {key}, name: {key}, kind: roi, organ: blood, scale: S,\n"
            f"   source: {{type: local, path: {key}}}}}\n"
        )
    path = root / "catalog.yaml"
    path.write_text("subdatasets:\n" + "".join(entries))
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def platform_env(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The instance on SQLite files under DAGSTER_HOME, or on a real PostgreSQL server."""
    if request.param == "postgres":
        use_postgres(monkeypatch)
    else:
        monkeypatch.delenv("DAGSTER_PG_HOST", raising=False)
    home = tmp_path / "home"
    prepare_instance(home, max_concurrent_runs=MAX_RUNS)
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "CPIA_CATALOG": str(_catalog(tmp_path / "sources")),
        "CPIA_DATA_DIR": str(tmp_path / "data"),
        "CPIA_WORKERS": "1",
    }


@contextmanager
def running_daemon(env: dict[str, str], log_file: Path) -> Iterator[subprocess.Popen]:
    """`dagster-daemon run` in its own process group, always stopped with its children."""
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", *MODULE],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            yield process
        finally:
            stop_process_group(process)


def _dagster(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dagster", *args], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _wait_for_runs(instance: dg.DagsterInstance, count: int, timeout: float) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs()
        if len(runs) >= count and all(run.is_finished for run in runs):
            return runs
        time.sleep(1)
    states = [(run.run_id[:8], run.status.value) for run in instance.get_runs()]
    raise AssertionError(f"runs not finished after {timeout} s: {states}")


def _most_at_once(records: list[dg.RunRecord]) -> int:
    edges = sorted(
        [(record.start_time, 1) for record in records]
        + [(record.end_time, -1) for record in records]
    )
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


@pytest.fixture
def automation_stopped(platform_env: dict[str, str]) -> None:
    """The README's command to stop the automation sensor, run before the daemon starts: run
    while the daemon's first tick stores the sensor's state, both may insert it at once."""
    _dagster(platform_env, "sensor", "stop", SENSOR_NAME, *MODULE)


def test_backfill_under_the_daemon_runs_each_partition_once_within_the_queue_limit(
    platform_env: dict[str, str], automation_stopped: None, tmp_path: Path
) -> None:
    again = KEYS[0]  # asked for by a second backfill too: its two runs must take turns
    for partitions in ((again,), KEYS):  # both queued before the daemon starts either
        _dagster(
            platform_env, "job", "backfill", *MODULE, "-j", "build_subdatasets",
            "--partitions", ",".join(partitions), "--noprompt",
        )  # fmt: skip
    log = tmp_path / "daemon.log"
    with (
        running_daemon(platform_env, log) as daemon,
        dg.DagsterInstance.from_config(platform_env["DAGSTER_HOME"]) as instance,
    ):
        runs = _wait_for_runs(instance, len(KEYS) + 1, timeout=600)
        assert daemon.poll() is None, log.read_text()[-3000:]
        assert [run.status for run in runs] == [dg.DagsterRunStatus.SUCCESS] * (len(KEYS) + 1)
        assert sorted(run.tags["dagster/partition"] for run in runs) == sorted([*KEYS, again])
        assert len({run.tags["dagster/backfill"] for run in runs}) == 2
        records = instance.get_run_records(dg.RunsFilter(run_ids=[run.run_id for run in runs]))
        assert _most_at_once(records) <= MAX_RUNS
        same = [r for r in records if r.dagster_run.tags["dagster/partition"] == again]
        assert _most_at_once(same) == 1  # the queue's per-partition limit kept them apart
        for name in PARTITIONED_ASSETS:
            events = instance.fetch_materializations(dg.AssetKey(name), limit=100).records
            per_partition = Counter(event.partition_key for event in events)
            assert per_partition == {**dict.fromkeys(KEYS, 1), again: 2}, name
        run = runs[0]
        run_pid = _pids(instance, run.run_id, dg.DagsterEventType.RUN_START)
        step_pids = _pids(instance, run.run_id, dg.DagsterEventType.STEP_START)
        steps = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        assert len(step_pids) == len(steps) >= 3  # each step in its own process
        assert not step_pids & run_pid


def _pids(instance: dg.DagsterInstance, run_id: str, event: dg.DagsterEventType) -> set[int]:
    return {
        entry.dagster_event.pid
        for entry in instance.all_logs(run_id, of_type=event)
        if entry.dagster_event is not None
    }
