"""Dagster entry point (`workspace.yaml`, `dagster ... -m cpia_assets.definitions`).

The active catalog comes from `CPIA_CATALOG` (a file path, `demo`, or unset for the full CPIA
catalog) and outputs go under `CPIA_DATA_DIR` (default ./data). Both are read when Dagster loads
the definitions, never at import time; tests call `build_definitions` directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from cpia_assets.core.catalog import Catalog, load_catalog
from cpia_assets.core.layout import default_data_dir
from cpia_assets.defs.assets.manifest import build_manifest_assets
from cpia_assets.defs.assets.mini import build_cpia_mini, build_training_shards
from cpia_assets.defs.assets.raw import build_raw_download
from cpia_assets.defs.assets.ssl import build_ssl_assets
from cpia_assets.defs.assets.standardize import build_standardize_and_tile
from cpia_assets.defs.partitions import subdataset_partitions
from cpia_assets.defs.pools import pool_watch
from cpia_assets.defs.resources import CpiaStore, WorkerPool
from cpia_assets.defs.schedules import build_schedules

PARTITIONED_ASSETS = ("raw_download", "standardized_wsi", "scale_tiles", "cpia_mini")


def build_definitions(catalog: Catalog, data_dir: Path, *, workers: int = 0) -> dg.Definitions:
    partitions = subdataset_partitions(catalog)
    partitioned = [
        build_raw_download(partitions),
        build_standardize_and_tile(partitions),
        build_cpia_mini(partitions),
    ]
    subdatasets_job = dg.define_asset_job(
        "build_subdatasets",
        selection=list(PARTITIONED_ASSETS),
        partitions_def=partitions,
        description=(
            "Download, standardize, tile and build CPIA-Mini of one sub-dataset (one run per "
            "partition)."
        ),
    )
    manifest_job = dg.define_asset_job(
        "refresh_manifest",
        selection=["tile_manifest"],
        description="Load changed partitions into manifest.duckdb and run its checks.",
    )
    return dg.Definitions(
        assets=[
            *partitioned,
            *build_manifest_assets(),
            build_training_shards(),
            *build_ssl_assets(),
        ],
        jobs=[subdatasets_job, manifest_job],
        schedules=build_schedules(subdatasets_job, manifest_job),
        sensors=[pool_watch],
        # Every run is a chain of steps (one partition's stages) whose per-slide work already
        # runs in the `workers` pool: steps run in the run's process, sharing that pool,
        # instead of paying a process start-up and a new pool each.
        executor=dg.in_process_executor,
        resources={
            "store": CpiaStore(data_dir=str(data_dir), catalog_path=str(catalog.path)),
            "workers": WorkerPool(workers=workers),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    workers = int(os.environ.get("CPIA_WORKERS", "0"))
    return build_definitions(
        load_catalog(os.environ.get("CPIA_CATALOG")), default_data_dir(), workers=workers
    )
