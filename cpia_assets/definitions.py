"""Dagster entry point (`workspace.yaml`, `dagster ... -m cpia_assets.definitions`).

The active catalog comes from `CPIA_CATALOG` (a file path, `demo`, or unset for the full CPIA
catalog) and outputs go under `CPIA_DATA_DIR` (default ./data). Both are read when Dagster loads
the definitions, never at import time; tests call `build_definitions` directly.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import dagster as dg

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.model import Catalog
from cpia_assets.core.layout import DataLayout, default_data_dir
from cpia_assets.defs.assets.downloads import SOURCE_ASSET, build_raw_download, build_source_files
from cpia_assets.defs.assets.manifest import build_manifest_assets
from cpia_assets.defs.assets.ssl import build_ssl_assets
from cpia_assets.defs.assets.standardize import build_standardize_and_tile
from cpia_assets.defs.assets.training import build_cpia_mini, build_training_shards
from cpia_assets.defs.automation import automation_sensor, with_automation
from cpia_assets.defs.locks import RESOURCE_KEY as LOCKS_RESOURCE
from cpia_assets.defs.locks import PartitionLocks
from cpia_assets.defs.partitions import subdataset_partitions
from cpia_assets.defs.pools import pool_reporting_executor, pool_watch
from cpia_assets.defs.resources import CpiaStore, WorkerPool
from cpia_assets.defs.schedules import build_schedules

PARTITIONED_ASSETS = ("raw_download", "standardized_wsi", "scale_tiles", "cpia_mini")
MANIFEST_ASSET = "tile_manifest"
AUTOMATED_ASSETS = (*PARTITIONED_ASSETS, MANIFEST_ASSET)
OBSERVE_JOB = "observe_sources"


def build_definitions(
    catalog: Catalog, data_dir: Path, *, workers: int = 0, dask_scheduler: str | None = None
) -> dg.Definitions:
    partitions = subdataset_partitions(catalog)
    source_files = build_source_files(partitions)
    tile_manifest, manifest_checks = build_manifest_assets()
    automated = with_automation(
        [
            build_raw_download(partitions),
            build_standardize_and_tile(partitions),
            build_cpia_mini(partitions),
            tile_manifest,
        ],
        partitioned=PARTITIONED_ASSETS,
        aggregate=MANIFEST_ASSET,
    )
    subdatasets_job = dg.define_asset_job(
        "build_subdatasets",
        selection=list(PARTITIONED_ASSETS),
        partitions_def=partitions,  # the schedule reads it from the unresolved job
        description=(
            "Download, standardize, tile and build CPIA-Mini of one sub-dataset (one run per "
            "partition; each step in its own process, so backfills under the run queue isolate "
            "a crashing step)."
        ),
        config={"execution": {"config": {"multiprocess": {}}}},
    )
    observe_job = dg.define_asset_job(
        OBSERVE_JOB,
        selection=[SOURCE_ASSET],
        description="Observe every sub-dataset's catalog entry and local file listing.",
    )
    manifest_job = dg.define_asset_job(
        "refresh_manifest",
        selection=["tile_manifest"],
        description="Load changed partitions into manifest.duckdb and run its checks.",
    )
    return dg.Definitions(
        assets=[
            source_files,
            *automated,
            manifest_checks,
            build_training_shards(),
            *build_ssl_assets(),
        ],
        jobs=[subdatasets_job, manifest_job, observe_job],
        schedules=build_schedules(subdatasets_job, manifest_job),
        sensors=[
            pool_watch,
            automation_sensor([SOURCE_ASSET, *PARTITIONED_ASSETS, MANIFEST_ASSET]),
        ],
        executor=pool_reporting_executor,
        resources={
            "store": CpiaStore(data_dir=str(data_dir), catalog_path=str(catalog.path)),
            "workers": WorkerPool(workers=workers, dask_scheduler=dask_scheduler),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
            LOCKS_RESOURCE: PartitionLocks(),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    catalog = os.environ.get("CPIA_CATALOG")
    return _definitions(
        catalog,
        _file_stamp(catalog),
        default_data_dir(),
        int(os.environ.get("CPIA_WORKERS", "0")),
        os.environ.get("CPIA_DASK_SCHEDULER") or None,
    )


@functools.lru_cache(maxsize=4)
def _definitions(
    catalog_name: str | None,
    stamp: tuple[int, int] | None,
    data_dir: Path,
    workers: int,
    dask_scheduler: str | None,
) -> dg.Definitions:
    """The definitions for these settings, built once per process: Dagster loads them several
    times in one CLI run (six for `dagster asset materialize`), each load parsing the catalog
    and building every asset again. `stamp` (the catalog file's mtime and size) rebuilds them
    when the catalog file changes."""
    catalog = load_catalog(catalog_name, cache_dir=DataLayout(data_dir).catalog_cache_dir)
    return build_definitions(catalog, data_dir, workers=workers, dask_scheduler=dask_scheduler)


def _file_stamp(name: str | None) -> tuple[int, int] | None:
    try:
        stat = Path(name).stat() if name else None
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size) if stat else None
