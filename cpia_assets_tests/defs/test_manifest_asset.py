"""tile_manifest and its checks in real Dagster runs: on the small catalog's build, and beside
partition runs as separate CLI processes on a persistent instance."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from PIL import Image

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.fsutil import sha256_file
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.core.manifest.queries import (
    trace_image,
)
from cpia_assets.defs.instance import DUCKDB_POOL as POOL
from cpia_assets.defs.instance import ensure_pool_limits, prepare_instance
from cpia_assets_tests.support.outputs import check_results
from cpia_assets_tests.support.small_catalog import copy_build


@dataclass(frozen=True)
class PipelineRun:
    layout: DataLayout
    defs: dg.Definitions
    instance: dg.DagsterInstance
    partition_runs: dict[str, str]  # partition key -> run id


def materialize_manifest(run: PipelineRun) -> dg.ExecuteInProcessResult:
    """The refresh_manifest job: tile_manifest and its four checks."""
    result = run.defs.resolve_job_def("refresh_manifest").execute_in_process(instance=run.instance)
    assert result.success
    return result


def manifest_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [materialization] = result.asset_materializations_for_node("tile_manifest")
    return {key: value.value for key, value in materialization.metadata.items()}


@pytest.fixture(scope="module")
def pipeline(small_build, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineRun]:
    """Every partition of the small test catalog materialized in process: a copy of
    `small_build` that these tests may change, with no manifest loaded yet."""
    layout, defs = copy_build(small_build, tmp_path_factory.mktemp("pipeline") / "data")
    runs = {key: result.run_id for key, result in small_build["results"].items()}
    with dg.instance_for_test() as instance:
        ensure_pool_limits(instance)
        yield PipelineRun(layout, defs, instance, runs)


def test_pool_limit_is_set_once_on_the_instance(pipeline: PipelineRun) -> None:
    storage = pipeline.instance.event_log_storage
    assert storage.get_concurrency_info(POOL).slot_count == 1
    ensure_pool_limits(pipeline.instance)
    assert storage.get_concurrency_info(POOL).slot_count == 1
    assert pipeline.defs.resolve_assets_def("tile_manifest").op.pool == POOL


def test_tile_manifest_loads_real_partitions_and_passes_its_checks(pipeline: PipelineRun) -> None:
    layout = pipeline.layout
    result = materialize_manifest(pipeline)
    metadata = manifest_metadata(result)
    parquet_rows = sum(
        pl.read_parquet(layout.manifest_file(key, "tiles")).height
        for key in pipeline.partition_runs
    )
    assert metadata["rows_tiles"] == parquet_rows > 0
    assert metadata["partitions_reloaded"] == list(pipeline.partition_runs)
    assert metadata["partitions_unchanged"] == 0
    note, _, *table = metadata["table_i"].splitlines()
    assert "paper's Table I" in note and "later, larger release" in note
    assert table[0].startswith("| organ | sub-datasets | sub-datasets (paper v1) | WSIs-XL |")
    assert table[-1].startswith("| Total | 4 | 103 |")
    assert table[-1].endswith(f"| {parquet_rows:,} | 21,427,877 |")
    with Image.open(metadata["mosaic"]) as mosaic:
        assert mosaic.format == "PNG" and mosaic.height > 4 * 96
    assert metadata["mosaic_preview"].startswith("![sample images")
    compared = metadata["built_vs_published"].splitlines()
    assert compared[0].startswith("| subdataset | organ | kind | built_xl | published_xl |")
    assert sorted(line.split(" | ")[0][2:] for line in compared[2:]) == sorted(
        pipeline.partition_runs
    )
    assert metadata["duckdb"] == str(layout.duckdb_path)
    assert check_results(result) == {
        "rows_have_files": True, "no_orphan_files": True, "ratios_within_spec": True,
        "unique_names_per_folder": True, "raw_files_accounted": True,
        "mini_ratios": True,
    }  # fmt: skip


def test_lineage_of_a_real_tile_reaches_its_source_sha256(pipeline: PipelineRun) -> None:
    materialize_manifest(pipeline)
    layout = pipeline.layout
    with open_manifest(layout) as con:
        [(name, source)] = con.execute(
            "SELECT image_name, source_file FROM tiles WHERE subdataset = 'wsi-20x' "
            "AND scale = 'S' ORDER BY image_name LIMIT 1"
        ).fetchall()
        steps = trace_image(con, name)
    assert steps["step"].to_list() == [
        "source file", "standardized slide", "XL tile", "M tile", "S tile",
    ]  # fmt: skip
    assert steps["item"][0] == source
    assert steps["sha256"][0] == sha256_file(layout.root / source)
    assert set(steps["run_id"]) == {pipeline.partition_runs["wsi-20x"]}
    assert steps["code_version"].to_list() == ["1", "3", "3", "3", "3"]  # raw_download, then ours


def test_a_rematerialized_partition_is_reloaded_alone(pipeline: PipelineRun) -> None:
    materialize_manifest(pipeline)
    rerun = pipeline.defs.resolve_job_def("build_subdatasets").execute_in_process(
        partition_key="roi-cells",
        instance=pipeline.instance,
        asset_selection=[dg.AssetKey("scale_tiles")],
    )
    assert rerun.success
    metadata = manifest_metadata(materialize_manifest(pipeline))
    assert metadata["partitions_reloaded"] == ["roi-cells"]
    assert metadata["partitions_unchanged"] == 3
    assert metadata["files_loaded"] == 2  # tiles and rejected_tiles
    with open_manifest(pipeline.layout) as con:
        runs = dict(con.execute("SELECT DISTINCT subdataset, run_id FROM tiles").fetchall())
    assert runs == {**pipeline.partition_runs, "roi-cells": rerun.run_id}


def test_the_checks_fail_on_a_deleted_file_and_on_an_orphan(pipeline: PipelineRun) -> None:
    materialize_manifest(pipeline)
    image = next((pipeline.layout.cpia_dir / "M" / "wsi-40x").glob("*.jpg"))
    content = image.read_bytes()
    orphan = pipeline.layout.cpia_dir / "S" / "roi-cells" / "stray.jpg"
    image.unlink()
    orphan.write_bytes(content)
    try:
        checks = check_results(materialize_manifest(pipeline))
    finally:
        image.write_bytes(content)
        orphan.unlink()
    assert checks == {
        "rows_have_files": False, "no_orphan_files": False, "ratios_within_spec": True,
        "unique_names_per_folder": True, "raw_files_accounted": True,
        "mini_ratios": True,
    }  # fmt: skip
    assert check_results(materialize_manifest(pipeline))["rows_have_files"]


# ---------------------------------------------------------------------------------------------
# Dagster: partitions and the manifest materialized at the same time, as separate CLI runs
# (multiprocess executor, persistent instance with the platform's dagster.yaml)

CONCURRENT_CATALOG = """\
subdatasets:
- {key: wsi-a, name: WSI A, kind: wsi, organ: breast, source: {type: synthetic, recipe: wsi,
   slides: [{name: A-0001, width: 4000, height: 3950, mpp: 0.5, seed: 1}]}}
- {key: wsi-b, name: WSI B, kind: wsi, organ: lung, source: {type: synthetic, recipe: wsi,
   slides: [{name: B-0001, width: 4000, height: 3950, mpp: 0.5, seed: 2}]}}
- {key: roi-a, name: ROI A, kind: roi, organ: blood, scale: S, source: {type: synthetic,
   recipe: roi, layout: folders, classes: [a, b], per_split: {train: 2, val: 1, test: 1}, seed: 3}}
- {key: roi-b, name: ROI B, kind: roi, organ: skin, scale: M, source: {type: synthetic,
   recipe: roi, layout: folders, classes: [a, b], per_split: {train: 2, val: 1, test: 1}, seed: 4}}
"""
# Multiprocess executor; step processes fork from one that imported the code once.
FORKSERVER = '{"execution": {"config": {"multiprocess": {"start_method": {"forkserver": {}}}}}}'
LOCK_ERRORS = re.compile(r"could not set lock|conflicting lock|database is locked", re.I)
DUCKDB_STEPS = {"tile_manifest", "manifest_checks"}


def test_partition_runs_beside_manifest_runs_lose_nothing(tmp_path: Path) -> None:
    home, data, catalog_file = tmp_path / "home", tmp_path / "data", tmp_path / "catalog.yaml"
    catalog_file.write_text(CONCURRENT_CATALOG)
    prepare_instance(home)
    env = {**os.environ, "DAGSTER_HOME": str(home), "CPIA_CATALOG": str(catalog_file),
           "CPIA_DATA_DIR": str(data), "CPIA_WORKERS": "1"}  # fmt: skip

    def materialize(*args: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "dagster", "asset", "materialize",
                   "-m", "cpia_assets.definitions", "--config-json", FORKSERVER, *args]  # fmt: skip
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    keys = load_catalog(catalog_file).keys
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # Two manifest runs (each: tile_manifest and its 5 checks) start with the 4 partition
        # runs; they compete for the pool; a last one loads whatever they missed.
        concurrent = [
            *(materialize("--select", "raw_download,standardized_wsi,scale_tiles",
                          "--partition", key) for key in keys),
            materialize("--select", "tile_manifest"),
            materialize("--select", "tile_manifest"),
        ]  # fmt: skip
        outputs = [run.communicate()[0] for run in concurrent]
        last = materialize("--select", "tile_manifest")
        outputs.append(last.communicate()[0])
        assert [run.returncode for run in [*concurrent, last]] == [0] * 7, "\n".join(outputs)
        assert not [
            line for out in outputs for line in out.splitlines() if LOCK_ERRORS.search(line)
        ]

        runs = instance.get_runs()  # newest first
        manifest_runs = [run for run in runs if dg.AssetKey("tile_manifest") in run.asset_selection]
        partition_runs = [run for run in runs if run not in manifest_runs]
        assert len(manifest_runs) == 3 and len(partition_runs) == 4
        # The manifest steps waited for the pool's one slot (on SQLite storage two steps that
        # claim it at the same instant may both get it; then DuckDB's file lock makes one wait).
        blocked = [record for run in manifest_runs for record in instance.all_logs(run.run_id)
                   if f"blocked by limit for pool {POOL}" in (record.message or "")]  # fmt: skip
        assert blocked
        spans = list(_step_spans(instance, manifest_runs[1:], DUCKDB_STEPS))
        partition_steps = {"raw_download", "standardize_and_tile"}
        writing = list(_step_spans(instance, partition_runs, partition_steps))
        assert len(spans) == 4 and len(writing) == 8
        assert any(start < other_end and other_start < end for start, end in spans
                   for other_start, other_end in writing)  # fmt: skip
        checks = instance.all_logs(
            manifest_runs[0].run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        )
        results = [event.dagster_event.asset_check_evaluation_data for event in checks]
        assert {result.check_name: result.passed for result in results} == {
            "rows_have_files": True, "no_orphan_files": True, "ratios_within_spec": True,
            "unique_names_per_folder": True, "raw_files_accounted": True,
            "mini_ratios": True,
        }  # fmt: skip

    layout = DataLayout(data)
    with open_manifest(layout) as con:
        loaded = dict(con.execute("SELECT subdataset, count(*) FROM tiles GROUP BY ALL").fetchall())
        run_ids = dict(con.execute("SELECT DISTINCT subdataset, run_id FROM tiles").fetchall())
    written = {key: pl.read_parquet(layout.manifest_file(key, "tiles")) for key in keys}
    assert loaded == {key: frame.height for key, frame in written.items()}
    assert run_ids == {key: frame["run_id"][0] for key, frame in written.items()}


def _step_spans(
    instance: dg.DagsterInstance, runs: Iterable[dg.DagsterRun], steps: set[str]
) -> Iterator[tuple[float, float]]:
    """(start, end) timestamps of the named steps in these runs."""
    for run in runs:
        started: dict[str, float] = {}
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event is None or event.step_key not in steps:
                continue
            if event.event_type_value == "STEP_START":
                started[event.step_key] = record.timestamp
            elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                yield started.pop(event.step_key), record.timestamp
