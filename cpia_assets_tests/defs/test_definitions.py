from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.definitions import build_definitions

EXPECTED_ASSETS = {
    "source_files", "raw_download", "standardized_wsi", "scale_tiles", "cpia_mini", "tile_manifest",
    "training_shards", "ssl_checkpoint", "downstream_eval",
}  # fmt: skip


def test_full_catalog_definitions_have_103_partitions(tmp_path: Path) -> None:
    defs = build_definitions(load_catalog(), tmp_path)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == EXPECTED_ASSETS
    partitioned = defs.resolve_assets_def("scale_tiles").partitions_def
    assert partitioned is not None
    assert len(partitioned.get_partition_keys()) == 103
    assert "tcga-brca" in partitioned.get_partition_keys()
    assert defs.resolve_assets_def("tile_manifest").partitions_def is None
    assert {s.name for s in defs.schedules} == {"weekly_backfill", "manifest_refresh"}
    automation = defs.resolve_sensor_def("cpia_automation")
    assert automation.default_status == dg.DefaultSensorStatus.RUNNING


def test_weekly_backfill_requests_one_run_per_partition(tmp_path: Path) -> None:
    defs = build_definitions(load_catalog("demo"), tmp_path)
    schedule = defs.resolve_schedule_def("weekly_backfill")
    tick = datetime(2026, 11, 28, 2, tzinfo=UTC)
    repository = defs.get_repository_def()
    with dg.build_schedule_context(
        scheduled_execution_time=tick, repository_def=repository
    ) as context:
        requests = schedule.evaluate_tick(context).run_requests
    assert sorted(r.partition_key for r in requests) == sorted(load_catalog("demo").keys)
    assert {r.run_key for r in requests} == {f"2026-11-28:{k}" for k in load_catalog("demo").keys}


@pytest.mark.parametrize("catalog", ["demo", "cpia"])
def test_cli_validates_definitions(tmp_path: Path, catalog: str) -> None:
    env = {**os.environ, "CPIA_CATALOG": catalog, "CPIA_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "dagster", "definitions", "validate"]
    command += ["-m", "cpia_assets.definitions"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_loading_definitions_imports_no_heavy_libraries(tmp_path: Path) -> None:
    code = (
        "import sys, cpia_assets.definitions as d; d.defs();"
        "heavy = ('torch', 'timm', 'torchvision', 'pytorch_lightning', 'webdataset');"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    env = {**os.environ, "CPIA_DATA_DIR": str(tmp_path)}  # where the catalog cache goes
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_run_config_mirrors_the_core_settings(tmp_path: Path) -> None:
    defs = build_definitions(load_catalog("demo"), tmp_path)
    job = defs.resolve_job_def("build_subdatasets")
    config = {
        "ops": {
            "standardize_and_tile": {
                "config": {
                    "wsi": {"target_mpp": 0.4942},
                    "roi": {"size": 224},
                    "tiles": {"jpeg_quality": 95, "thresholds": {"xl_min_tissue": 0.5}},
                }
            },
        }
    }
    resolved = dg.validate_run_config(job, config)["ops"]["standardize_and_tile"]["config"]
    assert resolved["wsi"]["target_mpp"] == 0.4942
    assert resolved["wsi"]["jpeg_quality"] == 89  # core default: YCbCr 4:2:0
    assert resolved["tiles"]["thresholds"]["saturation"] == 0.08
    with pytest.raises(dg.DagsterInvalidConfigError):
        bad = {"standardize_and_tile": {"config": {"tiles": {"xl_sise": 1}}}}
        dg.validate_run_config(job, {"ops": bad})
