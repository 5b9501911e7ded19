"""Two builds of one partition at once, as a user starts them: `dagster asset materialize` twice.

Before the partition lock, each build's slide jobs removed the other's temporaries and two of
four slides ended with no TIFF and no tiles while both runs reported success. Now the second
build waits for the first (naming its run and process) and reuses its work, or fails at once
(`when_busy: fail`); a SIGKILLed build's lock is taken over by the next one; and the run queue
starts one run per partition at a time."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.locks import partition_lock, read_holder
from cpia_assets.defs.instance import limits_runs_per_partition, prepare_instance
from cpia_assets_tests.support.postgres import use_postgres
from cpia_assets_tests.support.processes import start_until_ready, stop_process_group

KEY = "four"
CATALOG = f"""\
subdatasets:
- key: {KEY}
  name: Four slides
  kind: wsi
  organ: breast
  source:
    type: synthetic
    recipe: wsi
    slides:
""" + "".join(
    f"    - {{name: S-000{i}, width: 4000, height: 3950, mpp: 0.5, seed: {i}}}\n"
    for i in range(1, 5)
)
BUILD = ["--select", "standardized_wsi,scale_tiles", "--partition", KEY]
FAIL_AT_ONCE = '{"resources": {"partition_locks": {"config": {"when_busy": "fail"}}}}'
RUN_ID = re.compile(r"__ASSET_JOB - ([0-9a-f-]{36}) - ")
GATE = """import sys
from pathlib import Path
from cpia_assets.core.locks import exclusive
with exclusive(Path(sys.argv[1]), run_id="test-gate", what="the test"):
    print("ready", flush=True)
    sys.stdin.read()
"""


def prepare_home(home: Path) -> dict[str, str]:
    """The Dagster instance the CLI builds share, and the environment that selects it."""
    prepare_instance(home, env={})
    return {"DAGSTER_HOME": str(home)}


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The catalog and a data folder with the partition's raw files (downloaded once)."""
    root = tmp_path_factory.mktemp("downloaded")
    (root / "catalog.yaml").write_text(CATALOG)
    env = _env(root / "catalog.yaml", root / "data", prepare_home(root / "home"))
    result = subprocess.run(_command("--select", "raw_download", "--partition", KEY), env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"catalog": root / "catalog.yaml", "data": root / "data"}


@pytest.fixture
def cli_env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    downloaded: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """A copy of the downloaded data folder and its instance: SQLite, or with the indirect
    parameter "postgres" a new database on a real PostgreSQL server (`support/postgres.py`)."""
    data = tmp_path / "data"
    shutil.copytree(downloaded["data"], data, symlinks=True)
    if getattr(request, "param", "sqlite") == "postgres":
        use_postgres(monkeypatch)  # DAGSTER_PG_*: prepare_instance writes Postgres storage
        prepare_instance(tmp_path / "home")
        return _env(downloaded["catalog"], data, {"DAGSTER_HOME": str(tmp_path / "home")})
    return _env(downloaded["catalog"], data, prepare_home(tmp_path / "home"))


def _env(catalog: Path, data: Path, instance: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "CPIA_CATALOG": str(catalog), "CPIA_DATA_DIR": str(data),
            "CPIA_WORKERS": "1", **instance}  # fmt: skip


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dagster", "asset", "materialize", "-m",
            "cpia_assets.definitions", *args]  # fmt: skip


class Build:
    """A `dagster asset materialize` in its own process group, its output in a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                _command(*BUILD, *args),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text()

    def run_id(self) -> str:
        return RUN_ID.search(self.text())[1]

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=300)
        finally:
            if self.process.poll() is None:
                stop_process_group(self.process)


def _wait_for(condition: Callable[[], object], what: str, *builds: Build) -> None:
    """Poll until `condition` holds, failing early (with its output) when a build exits."""
    deadline = time.monotonic() + 180
    while not condition():
        for build in builds:
            assert build.process.poll() is None, f"exited before {what}: {build.text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _assert_one_complete_build(data: Path) -> None:
    """Every slide standardized and tiled once, nothing half-written, no failure recorded."""
    layout = DataLayout(data)
    slides = pl.read_parquet(layout.manifest_file(KEY, "slides"))
    assert sorted(slides["standardized_file"]) == [
        f"standardized/{KEY}/S-000{i}.tiff" for i in range(1, 5)
    ]
    assert sorted(p.name for p in layout.standardized_dir(KEY).iterdir()) == [
        f"S-000{i}.tiff" for i in range(1, 5)
    ]  # no temporaries left
    for asset in ("standardized_wsi", "scale_tiles"):
        failures = layout.manifest_file(KEY, f"failures-{asset}")
        assert not failures.exists() or pl.read_parquet(failures).height == 0, asset
    tiles = pl.read_parquet(layout.manifest_file(KEY, "tiles"))
    on_disk = {
        str(path.relative_to(data))
        for folder in ("L", "M", "S")
        for path in (layout.cpia_dir / folder / KEY).iterdir()
    }
    assert on_disk == set(tiles["path"])  # every tile file is a record, and no hidden ones
    assert {Path(path).name.split("-")[0] + "-" + Path(path).name.split("-")[1]
            for path in tiles["path"]} == {f"S-000{i}" for i in range(1, 5)}  # fmt: skip


@pytest.mark.parametrize("cli_env", ["sqlite", "postgres"], indirect=True)
def test_two_overlapping_builds_of_one_partition_end_with_one_builds_output(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    data = Path(cli_env["CPIA_DATA_DIR"])
    # both builds start while the partition is held
    gate = start_until_ready(GATE, str(partition_lock(data, KEY)))
    builds = [Build(cli_env, tmp_path / f"build-{n}.log") for n in (1, 2)]
    try:
        for build in builds:
            _wait_for(lambda b=build: "partition lock: waiting for run test-gate" in b.text(),
                      "both builds wait", *builds)  # fmt: skip
        gate.communicate("")  # both now race for the lock: one builds, the other waits for it
        assert [build.finish() for build in builds] == [0, 0]
    finally:
        gate.kill()
        for build in builds:
            build.finish()
    one, two = builds
    first, second = (one, two) if f"waiting for run {one.run_id()}" in two.text() else (two, one)
    assert f"waiting for run {second.run_id()}" not in first.text()
    waited = f"partition lock: waiting for run {first.run_id()} (step standardize_and_tile, "
    assert f"{waited}process {first.pid} on " in second.text()
    assert second.text().count(": already done") == 4  # the second reused all of the first's
    _assert_one_complete_build(data)
    assert read_holder(partition_lock(data, KEY)) is None


def test_a_build_that_may_not_wait_fails_at_once_naming_the_holder(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    data = Path(cli_env["CPIA_DATA_DIR"])
    gate = start_until_ready(GATE, str(partition_lock(data, KEY)))
    try:
        build = Build(cli_env, tmp_path / "build.log", "--config-json", FAIL_AT_ONCE)
        assert build.finish() != 0
    finally:
        gate.communicate("")
    text = build.text()
    assert f"partition '{KEY}': partition-{KEY}.lock: held by run test-gate (the test, " in text
    assert "not waiting (when_busy: fail)" in text
    assert not DataLayout(data).standardized_dir(KEY).exists()  # nothing was touched


def test_a_sigkilled_builds_lock_is_taken_over_and_the_next_build_completes(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    data = Path(cli_env["CPIA_DATA_DIR"])
    lock = partition_lock(data, KEY)
    killed = Build(cli_env, tmp_path / "killed.log")
    try:
        _wait_for(lambda: "slide S-0001.tiff: " in killed.text(), "a slide is done", killed)
        assert read_holder(lock).pid == killed.pid
        os.killpg(killed.pid, signal.SIGKILL)  # mid-build: the next slide is being written
    finally:
        killed.finish()
    assert read_holder(lock).pid == killed.pid  # its record is left behind
    following = Build(cli_env, tmp_path / "following.log")
    assert following.finish() == 0, following.text()[-3000:]
    took_over = f"partition lock: took over the lock of run {killed.run_id()} (step "
    assert f"{took_over}standardize_and_tile, process {killed.pid} on " in following.text()
    assert "its process is gone" in following.text()
    _assert_one_complete_build(data)


def test_the_run_queue_starts_one_run_per_partition(tmp_path: Path) -> None:
    prepare_home(tmp_path / "home")
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        assert limits_runs_per_partition(instance)
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
        assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True},
                "limit": 1} in limits  # fmt: skip
    own = tmp_path / "own"
    own.mkdir()
    (own / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    prepare_instance(own, env={})  # a user's own dagster.yaml is left as it is
    assert (own / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"
    with dg.DagsterInstance.from_config(str(own)) as instance:
        assert not limits_runs_per_partition(instance)  # `python -m ...instance` says so
