"""Dagster instance settings the platform relies on: concurrency pools and run monitoring.

The run queue bounds how many runs execute at once (`MAX_CONCURRENT_RUNS`); pools bound
concurrency of steps across runs: `duckdb` (limit 1) keeps tile_manifest and its checks the only
process with manifest.duckdb open; `downloads` bounds how many raw_download steps run at once;
`gpu` (limit 1 per GPU host) keeps two trainings or evaluations off the same GPU.
Run monitoring lets the daemon free the slots of ended runs; `pools.py` frees those of killed ones.
Storage: SQLite files under DAGSTER_HOME, or PostgreSQL where DAGSTER_PG_HOST is set (below).
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
    # One run per partition at a time (builds of one partition would fight over its outputs);
    # `dagster asset materialize` bypasses the queue, the partition lock (defs/locks.py) not.
    tag_concurrency_limits:
    - key: dagster/partition
      value: {{{{applyLimitPerUniqueValue: true}}}}
      limit: 1
  pools:
    granularity: op
    default_limit: 1
# The daemon frees the pool slots of runs that ended (failed, canceled) this many seconds ago.
# Runs killed outright are freed by the pool_watch sensor (cpia_assets/defs/pools.py).
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 30
"""


# Instance storage (runs, events, schedules, pool slots) in PostgreSQL when DAGSTER_PG_HOST is set
# where `prepare_instance` runs (needs `pip install -e ".[postgres]"`); SQLite files under
# DAGSTER_HOME otherwise. dagster.yaml names the variables, not their values, so every process
# that opens the instance (CLI, daemon, webserver, run workers) needs them set too.
PG_REQUIRED = ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD")
PG_DEFAULTS: Mapping[str, str] = {"DAGSTER_PG_PORT": "5432", "DAGSTER_PG_DB": "dagster"}
_PG_FIELDS = {
    "hostname": "DAGSTER_PG_HOST",
    "port": "DAGSTER_PG_PORT",
    "username": "DAGSTER_PG_USER",
    "password": "DAGSTER_PG_PASSWORD",
    "db_name": "DAGSTER_PG_DB",
}


def storage_yaml(env: Mapping[str, str]) -> str:
    """dagster.yaml's `storage:` section for `env`: Postgres when DAGSTER_PG_HOST is set (each
    field read from its variable at run time; port and database default to 5432 and
    `dagster`), nothing (Dagster's SQLite default) otherwise."""
    if not env.get("DAGSTER_PG_HOST"):
        return ""
    missing = [name for name in PG_REQUIRED if not env.get(name)]
    if missing:
        raise dg.DagsterInvariantViolationError(
            f"DAGSTER_PG_HOST is set but {', '.join(missing)} is not: Postgres instance storage "
            "needs host, user and password (DAGSTER_PG_PORT and DAGSTER_PG_DB are optional)"
        )
    lines = ["# Instance storage in PostgreSQL: DAGSTER_PG_HOST was set (instance.py).",
             "storage:", "  postgres:", "    postgres_db:"]  # fmt: skip
    for field, name in _PG_FIELDS.items():
        value = f"{{env: {name}}}" if env.get(name) else PG_DEFAULTS[name]
        lines.append(f"      {field}: {value}")
    # SQLAlchemy 2.1 takes psycopg (3) for a bare postgresql:// URL; dagster-postgres ships
    # psycopg2.
    lines.append("      scheme: postgresql+psycopg2")
    return "\n".join(lines) + "\n"


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


def prepare_instance(
    home: Path,
    max_concurrent_runs: int = MAX_CONCURRENT_RUNS,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Create DAGSTER_HOME with the platform's dagster.yaml (unless the user has their own: an
    earlier version of ours is brought up to date) and set the pool limits on that instance.
    Its storage follows `env` (default: this process's environment), see `storage_yaml`."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or config.read_text().startswith(_HEADER):
        storage = storage_yaml(os.environ if env is None else env)
        config.write_text(INSTANCE_YAML.format(max_concurrent_runs=max_concurrent_runs) + storage)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        ensure_pool_limits(instance)
    return config


PARTITION_LIMIT_NOTE = """\
Note: this dagster.yaml is not the platform's and its run queue lets two runs of one partition
start at once (they then wait for each other's partition lock). To have the queue keep them
apart, add under concurrency: runs:
    tag_concurrency_limits:
    - {key: dagster/partition, value: {applyLimitPerUniqueValue: true}, limit: 1}"""


def limits_runs_per_partition(instance: dg.DagsterInstance) -> bool:
    """Whether the instance's run queue starts at most one run per partition (INSTANCE_YAML)."""
    limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits or []
    return any(
        limit.get("key") == "dagster/partition"
        and limit.get("value") == {"applyLimitPerUniqueValue": True}
        and limit.get("limit") == 1
        for limit in limits
    )


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
        with dg.DagsterInstance.from_config(str(home)) as instance:
            if not limits_runs_per_partition(instance):
                print(PARTITION_LIMIT_NOTE)
        return
    with dg.DagsterInstance.from_config(str(home)) as instance:
        freed = free_dead_run_slots(instance)
        lines = [*freed, *describe_holders(instance), *announce_waits(instance)]
    print("\n".join(lines) or "no pool slot is held; no step waits for a pool")


if __name__ == "__main__":
    main()
