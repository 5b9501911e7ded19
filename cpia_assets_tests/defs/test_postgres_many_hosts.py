"""README "Many hosts", on one machine: every part a separate process talking over 127.0.0.1.

A PostgreSQL server holds the Dagster instance (`support/postgres.py`, dagster.yaml written by
`prepare_instance` from DAGSTER_PG_*), `dask scheduler` and `dask worker` run the slides, and
`dagster asset materialize` builds one demo partition with CPIA_DASK_SCHEDULER set. A second
DAGSTER_HOME (another "host") sees the run and its materializations through the database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from distributed import Client

from cpia_assets.definitions import PARTITIONED_ASSETS
from cpia_assets.defs.instance import prepare_instance
from cpia_assets_tests.support.postgres import use_postgres
from cpia_assets_tests.support.processes import stop_process_group

BIN = Path(sys.executable).parent
KEY = "demo-wsi-20x"  # two demo slides at 0.5 µm/px


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """`dask scheduler` and `dask worker` (2 worker processes) as the README starts them."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    port = address.rsplit(":", 1)[1]
    logs = [(tmp_path / f"{name}.log").open("w") for name in ("scheduler", "worker")]
    commands = [
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port,
         "--no-dashboard"],
        [str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
         "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(tmp_path / "dask")],
    ]  # fmt: skip
    processes: list[subprocess.Popen] = []
    try:
        for command, log in zip(commands, logs, strict=True):
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
            )
            processes.append(process)
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            stop_process_group(process)
        for log in logs:
            log.close()


def test_demo_partition_on_postgres_storage_and_a_dask_cluster(
    dask_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_postgres(monkeypatch)
    home = tmp_path / "home"
    prepare_instance(home)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "CPIA_CATALOG": "demo",
        "CPIA_DATA_DIR": str(tmp_path / "data"),
        "CPIA_DASK_SCHEDULER": dask_cluster,
    }
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "cpia_assets.definitions",
         "--select", ",".join(PARTITIONED_ASSETS), "--partition", KEY],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with Client(dask_cluster, timeout=60) as client:
        prefixes = client.run_on_scheduler(
            lambda dask_scheduler: sorted(dask_scheduler.task_prefixes)
        )
    assert prefixes, "the Dask scheduler ran no task"
    tiles = list((tmp_path / "data" / "cpia").rglob("*.jpg"))
    assert tiles, "no tile written"

    # Another host: its own DAGSTER_HOME, the same database.
    with dg.DagsterInstance.from_config(str(prepare_instance(tmp_path / "other").parent)) as other:
        assert type(other.run_storage).__name__ == "PostgresRunStorage"
        (run,) = other.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == KEY
        for name in PARTITIONED_ASSETS:
            (event,) = other.fetch_materializations(dg.AssetKey(name), limit=10).records
            assert event.partition_key == KEY, name
