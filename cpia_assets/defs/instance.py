"""Dagster instance settings the platform relies on: concurrency pools and run monitoring.

The run queue bounds how many runs execute at once (`MAX_CONCURRENT_RUNS`); pools bound
concurrency of steps across runs: `duckdb` (limit 1) keeps tile_manifest and its checks the only
process with manifest.duckdb open; `downloads` bounds how many raw_download steps run at once;
`gpu` (limit 1 per GPU host) keeps two trainings or evaluations off the same GPU.
Run monitoring lets the daemon free the slots of ended runs; `pools.py` frees those of killed ones.
`make demo` and `make ui` prepare DAGSTER_HOME with `python -m cpia_assets.defs.instance`;
`python -m cpia_assets.defs.instance --pools` frees the slots of dead runs and lists who waits.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from cpia_assets.defs.pools import announce_waits, describe_holders, free_dead_run_slots

DUCKDB_POOL = "duckdb"
DOWNLOADS_POOL = "downloads"
GPU_POOL = "gpu"
POOL_LIMITS: Mapping[str, int] = {DUCKDB_POOL: 1, DOWNLOADS_POOL: 4, GPU_POOL: 1}

MAX_CONCURRENT_RUNS = 4
_HEADER = "# Written by cpia_assets (defs/instance.py)."
INSTANCE_YAML = f"""\
{_HEADER} A pool without an explicit limit gets 1; the
# explicit limits (duckdb 1, downloads 4, gpu 1) are set with `dagster instance concurrency set`.
# Runs launched by the UI, a backfill, a schedule or the automation wait in the run queue (the
# daemon starts them, at most max_concurrent_runs at once); each run executes its steps in
# separate processes. `dagster asset materialize` runs in the calling process, outside the queue.
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 2
concurrency:
  runs:
    max_concurrent_runs: {{max_concurrent_runs}}
  pools:
    granularity: op
    default_limit: 1
# The daemon frees the pool slots of runs that ended (failed, canceled) this many seconds ago.
# Runs killed outright are freed by the pool_watch sensor (cpia_assets/defs/pools.py).
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 30
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


def prepare_instance(home: Path, max_concurrent_runs: int = MAX_CONCURRENT_RUNS) -> Path:
    """Create DAGSTER_HOME with the platform's dagster.yaml (unless the user has their own: an
    earlier version of ours is brought up to date) and set the pool limits on that instance."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or config.read_text().startswith(_HEADER):
        config.write_text(INSTANCE_YAML.format(max_concurrent_runs=max_concurrent_runs))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        ensure_pool_limits(instance)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cpia_assets.defs.instance")
    parser.add_argument("home", nargs="?", help="DAGSTER_HOME (default: $DAGSTER_HOME)")
    parser.add_argument(
        "--pools",
        action="store_true",
        help="free the pool slots of runs whose process is gone; list slot holders and waiters",
    )
    args = parser.parse_args(argv)
    home = Path(args.home or os.environ["DAGSTER_HOME"])
    if not args.pools:
        print(f"Dagster instance ready: {prepare_instance(home)}")
        return
    with dg.DagsterInstance.from_config(str(home)) as instance:
        freed = free_dead_run_slots(instance)
        lines = [*freed, *describe_holders(instance), *announce_waits(instance)]
    print("\n".join(lines) or "no pool slot is held; no step waits for a pool")


if __name__ == "__main__":
    main()
