"""Pool slots on the Dagster instance: who holds them, who waits, and freeing the slots of runs
whose process is gone.

A run killed with SIGKILL (out of memory, `kill -9`) never reports its end: it stays STARTED and
keeps its pool slot, and with the `duckdb` pool's single slot every later tile_manifest waits
forever. Dagster's run monitoring frees the slots of runs that *ended*
(`free_slots_after_run_end_seconds`, set in `instance.INSTANCE_YAML`), but its default run
launcher cannot tell that a local run's process died. `free_dead_run_slots` does: a run whose
recorded process no longer exists on this host is marked failed and its slots are freed.

The `pool_watch` sensor (running by default under the daemon, i.e. `make ui`) does that every
minute and writes an INFO line into every run whose step waits for a pool, naming the runs that
hold the pool's slots. By hand: `python -m cpia_assets.defs.instance --pools` does the same and
lists the slot holders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import dagster as dg


@dataclass(frozen=True)
class PoolStep:
    """A step that holds one of a pool's slots or waits for one."""

    pool: str
    run_id: str
    step_key: str


def slot_holders(instance: dg.DagsterInstance) -> list[PoolStep]:
    storage = instance.event_log_storage
    return [
        PoolStep(pool, slot.run_id, slot.step_key)
        for pool in sorted(storage.get_concurrency_keys())
        for slot in storage.get_concurrency_info(pool).claimed_slots
    ]


def waiting_steps(instance: dg.DagsterInstance) -> list[PoolStep]:
    storage = instance.event_log_storage
    return [
        PoolStep(pool, step.run_id, step.step_key)
        for pool in sorted(storage.get_concurrency_keys())
        for step in storage.get_concurrency_info(pool).pending_steps
        if step.assigned_timestamp is None
    ]


def describe_holders(instance: dg.DagsterInstance) -> list[str]:
    """One line per claimed slot: pool, run, step and the run's status."""
    return [
        f"pool {holder.pool!r}: slot held by {_holder_text(instance, holder)}"
        for holder in slot_holders(instance)
    ]


def free_dead_run_slots(instance: dg.DagsterInstance) -> list[str]:
    """Free every slot held by a run that ended or whose process is gone; a run left STARTED by
    a killed process is marked failed first. Returns one line per run freed.

    Processes are looked up on this host: use it where the runs run (the default run launcher).
    """
    freed = []
    for run_id in sorted({holder.run_id for holder in slot_holders(instance)}):
        run = instance.get_run_by_id(run_id)
        if run is None:
            why = "the run was deleted"
        elif run.is_finished:
            why = f"the run ended: {run.status.value}"
        else:
            pid = _run_pid(instance, run_id)
            if pid is None or _process_exists(pid):
                continue
            why = f"{run.status.value}, but its process {pid} is gone"
            instance.report_run_failed(run, f"its process {pid} is gone (killed?)")
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        freed.append(f"freed the pool slots of run {run_id} ({why})")
    return freed


def announce_waits(instance: dg.DagsterInstance) -> list[str]:
    """Write into every run with a step waiting for a pool which runs hold that pool's slots
    (an INFO event, where Dagster itself says only "blocked" at DEBUG). Returns the lines."""
    holders = slot_holders(instance)
    lines = []
    for waiting in waiting_steps(instance):
        held_by = [
            _holder_text(instance, holder) for holder in holders if holder.pool == waiting.pool
        ]
        line = (
            f"step {waiting.step_key} waits for a slot of pool {waiting.pool!r}, held by "
            f"{', '.join(held_by) or 'no run (the limit may be 0)'}"
        )
        run = instance.get_run_by_id(waiting.run_id)
        if run is not None:
            instance.report_engine_event(line, run, step_key=waiting.step_key)
        lines.append(f"run {waiting.run_id}: {line}")
    return lines


def _holder_text(instance: dg.DagsterInstance, holder: PoolStep) -> str:
    run = instance.get_run_by_id(holder.run_id)
    status = run.status.value if run is not None else "deleted"
    return f"run {holder.run_id} (step {holder.step_key}, {status})"


def _run_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run's orchestrating process (it claims and frees the slots), from RUN_START."""
    pids = [
        entry.dagster_event.pid
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)
        if entry.dagster_event is not None and entry.dagster_event.pid is not None
    ]
    return pids[-1] if pids else None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@dg.sensor(
    name="pool_watch",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Frees the pool slots of runs whose process is gone (killed) and tells steps waiting "
        "for a pool which runs hold it."
    ),
)
def pool_watch(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    lines = [*free_dead_run_slots(context.instance), *announce_waits(context.instance)]
    for line in lines:
        context.log.info(line)
    return dg.SkipReason("; ".join(lines) or "no dead slot holder, no step waiting for a pool")
