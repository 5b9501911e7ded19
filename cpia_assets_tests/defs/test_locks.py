"""Waiting on the DuckDB file lock and on Dagster pools says who holds them; a file that is not
a DuckDB database fails at once; slots of runs whose process is gone are freed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import dagster as dg
import duckdb
import pytest

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest.database import (
    ManifestError,
    ManifestUnavailableError,
    open_manifest,
)
from cpia_assets.core.manifest.tables import ensure_schema
from cpia_assets.definitions import build_definitions
from cpia_assets.defs.instance import DUCKDB_POOL, prepare_instance
from cpia_assets.defs.pools import (
    PoolStep,
    announce_waits,
    free_dead_run_slots,
    pool_reporting_executor,
    pool_watch,
    slot_holders,
    waiting_steps,
)

T = TypeVar("T")

HOLD_THE_LOCK = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a database at all" * 100])
def test_a_file_that_is_not_a_duckdb_database_fails_at_once(tmp_path: Path, content: bytes):
    layout = DataLayout(tmp_path)
    layout.duckdb_path.write_bytes(content)
    notices: list[str] = []
    with pytest.raises(ManifestError, match="is not a DuckDB database file") as raised:
        open_manifest(layout, on_wait=notices.append)
    assert not isinstance(raised.value, ManifestUnavailableError)
    assert str(layout.duckdb_path) in str(raised.value)
    assert notices == []  # no waiting for a lock nobody holds


def test_waiting_for_the_file_lock_names_the_process_that_holds_it(tmp_path: Path):
    layout = DataLayout(tmp_path)
    with duckdb.connect(str(layout.duckdb_path)) as con:
        ensure_schema(con)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(layout.duckdb_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        notices: list[str] = []
        with pytest.raises(ManifestUnavailableError, match=f"process {holder.pid} "):
            open_manifest(layout, wait_s=0.5, on_wait=notices.append)
        assert len(notices) == 1
        assert f"process {holder.pid} (" in notices[0] and "waiting up to" in notices[0]
    finally:
        holder.communicate("")
    open_manifest(layout).close()  # free again once the holder is gone


IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'


def _wait_for(condition: Callable[[], T | None], what: str, process: subprocess.Popen) -> T:
    """Poll until `condition` gives a value (bounded, so a broken run fails the test)."""
    for _ in range(1200):
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"exited before {what}: {process.communicate()[0]}"
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [record.message or "" for record in instance.all_logs(run_id)]


def test_a_killed_manifest_run_frees_its_pool_slot_and_waiting_steps_name_it(
    tmp_path: Path, small_catalog_path: Path
) -> None:
    home, layout = tmp_path / "home", DataLayout(tmp_path / "data")
    prepare_instance(home)
    assert "free_slots_after_run_end_seconds: 30" in (home / "dagster.yaml").read_text()
    env = {**os.environ, "DAGSTER_HOME": str(home), "CPIA_CATALOG": str(small_catalog_path),
           "CPIA_DATA_DIR": str(layout.root), "CPIA_WORKERS": "1"}  # fmt: skip
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m",
               "cpia_assets.definitions", "--select", "tile_manifest",
               "--config-json", IN_PROCESS]  # fmt: skip

    def materialize() -> subprocess.Popen[str]:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    layout.root.mkdir()
    duckdb.connect(str(layout.duckdb_path)).close()
    lock = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(layout.duckdb_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert lock.stdout.readline().strip() == "ready"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # 1. A manifest run takes the pool's slot, then waits for the file lock and says who
        #    holds it; it is killed there.
        first = materialize()
        (holder,) = _wait_for(lambda: slot_holders(instance), "the slot is taken", first)
        waiting = f"to open it for writing: process {lock.pid} ("
        _wait_for(
            lambda: any(waiting in m for m in _messages(instance, holder.run_id)),
            "the lock wait is logged",
            first,
        )
        first.kill()
        first.communicate()
        assert slot_holders(instance) == [holder]  # the dead run keeps its slot

        # 2. The next manifest run waits for the pool and says at once, itself (no daemon), which
        #    run holds it; the pool_watch sensor's line says the same.
        second = materialize()
        (blocked,) = _wait_for(lambda: waiting_steps(instance), "the step waits", second)
        assert blocked.pool == DUCKDB_POOL and blocked.step_key == "tile_manifest"
        held = f"held by run {holder.run_id} (step tile_manifest, STARTED)"
        expected = f"step tile_manifest waits for a slot of pool 'duckdb', {held}"
        warning = _wait_for(
            lambda: [r for r in instance.all_logs(blocked.run_id) if r.message == expected],
            "the run names the holder",
            second,
        )
        assert [(r.level, r.step_key) for r in warning] == [(logging.WARNING, "tile_manifest")]
        (line,) = announce_waits(instance)
        assert line == f"run {blocked.run_id}: {expected}"
        assert any(line.endswith(m) for m in _messages(instance, blocked.run_id) if m)

        # 3. By hand (the pool_watch sensor does the same): the dead run's slot is freed and
        #    the run marked failed; the waiting run then completes.
        freed = subprocess.run(
            [sys.executable, "-m", "cpia_assets.defs.instance", str(home), "--pools"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        gone = f"STARTED, but its process {first.pid} is gone"
        assert freed[0] == f"freed the pool slots of run {holder.run_id} ({gone})"
        lock.communicate("")
        output = second.communicate(timeout=300)[0]
        assert second.returncode == 0, output
        console = f"WARNING - __ASSET_JOB - {blocked.run_id} - tile_manifest - {expected}"
        assert console in output  # on the console of the CLI run too
        assert instance.get_run_by_id(holder.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(blocked.run_id).status == dg.DagsterRunStatus.SUCCESS
        assert slot_holders(instance) == [] and free_dead_run_slots(instance) == []


def test_pool_watch_runs_by_default_and_skips_when_nothing_waits() -> None:
    assert pool_watch.default_status == dg.DefaultSensorStatus.RUNNING
    with dg.instance_for_test() as instance:
        result = pool_watch(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message == "no dead slot holder, no step waiting for a pool"


def test_slots_of_ended_or_deleted_runs_are_freed_and_live_runs_keep_theirs() -> None:
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots(DUCKDB_POOL, 3)
        ended = instance.add_run(dg.DagsterRun("job", status=dg.DagsterRunStatus.CANCELED))
        live = instance.add_run(dg.DagsterRun("job", status=dg.DagsterRunStatus.STARTED))
        for run_id in (ended.run_id, live.run_id, "deleted-run"):
            assert storage.claim_concurrency_slot(DUCKDB_POOL, run_id, "tile_manifest").is_claimed
        freed = free_dead_run_slots(instance)
        assert sorted(freed) == sorted([
            f"freed the pool slots of run {ended.run_id} (the run ended: CANCELED)",
            "freed the pool slots of run deleted-run (the run was deleted)",
        ])  # fmt: skip
        # The live run has no RUN_START event yet (no process known): it keeps its slot.
        assert slot_holders(instance) == [PoolStep(DUCKDB_POOL, live.run_id, "tile_manifest")]


def test_the_pool_reporting_executor_takes_the_default_executors_config(tmp_path: Path) -> None:
    defs = build_definitions(load_catalog("demo"), tmp_path)
    job = defs.resolve_job_def("refresh_manifest")
    assert job.executor_def is pool_reporting_executor
    for mode, config in (("in_process", {}), ("multiprocess", {"max_concurrent": 2})):
        run_config = {"execution": {"config": {mode: config}}}
        resolved = dg.validate_run_config(job, run_config)["execution"]
        assert resolved["multi_or_in_process_executor"][mode].items() >= config.items()
