"""Dagster instance settings the platform relies on: concurrency pools.

Pools bound concurrency across runs: `duckdb` (limit 1) keeps tile_manifest and its checks the only
process with manifest.duckdb open; `downloads` bounds how many raw_download steps run at once;
`gpu` (limit 1 per GPU host) keeps two trainings or evaluations off the same GPU.
`make demo` and `make ui` prepare DAGSTER_HOME with `python -m cpia_assets.defs.instance`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

DUCKDB_POOL = "duckdb"
DOWNLOADS_POOL = "downloads"
GPU_POOL = "gpu"
POOL_LIMITS: Mapping[str, int] = {DUCKDB_POOL: 1, DOWNLOADS_POOL: 4, GPU_POOL: 1}

INSTANCE_YAML = """\
# Written by cpia_assets (defs/instance.py). A pool without an explicit limit gets 1; the
# explicit limits (duckdb 1, downloads 4, gpu 1) are set with `dagster instance concurrency set`.
concurrency:
  pools:
    granularity: op
    default_limit: 1
"""


def ensure_pool_limits(
    instance: dg.DagsterInstance, limits: Mapping[str, int] = POOL_LIMITS
) -> None:
    """Set pool limits on `instance`, as `dagster instance concurrency set POOL N` does.

    Idempotent. Note: on SQLite instance storage two steps claiming the last slot at the same
    instant can both get it; DuckDB opens therefore also wait on the file lock. Use Postgres
    instance storage for strict pools under heavy parallel load.
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        raise dg.DagsterInvariantViolationError(
            f"this Dagster instance's storage ({type(storage).__name__}) cannot enforce pool "
            f"limits; the pool {DUCKDB_POOL!r} needs a limit of 1 so one process writes "
            "manifest.duckdb"
        )
    for pool, limit in limits.items():
        if storage.get_concurrency_info(pool).slot_count != limit:
            storage.set_concurrency_slots(pool, limit)


def prepare_instance(home: Path) -> Path:
    """Create DAGSTER_HOME with the platform's dagster.yaml (unless the user has one) and set
    the pool limits on that instance."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_YAML)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        ensure_pool_limits(instance)
    return config


if __name__ == "__main__":
    home = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ["DAGSTER_HOME"])
    print(f"Dagster instance ready: {prepare_instance(home)}")
