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

Without a daemon (`dagster asset materialize`), the run itself says it: `pool_reporting_executor`,
the platform's default executor, is Dagster's default one whose "Step blocked by limit for pool"
DEBUG event (sent when a step starts waiting, then every 5 minutes) is followed by a WARNING
naming the runs that hold the pool's slots.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagster as dg

if TYPE_CHECKING:
    from dagster._core.execution.context.system import PlanOrchestrationContext
    from dagster._core.execution.plan.plan import ExecutionPlan


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
        line = _wait_line(instance, waiting, holders)
        run = instance.get_run_by_id(waiting.run_id)
        if run is not None:
            instance.report_engine_event(line, run, step_key=waiting.step_key)
        lines.append(f"run {waiting.run_id}: {line}")
    return lines


def _wait_line(instance: dg.DagsterInstance, waiting: PoolStep, holders: list[PoolStep]) -> str:
    held_by = [_holder_text(instance, holder) for holder in holders if holder.pool == waiting.pool]
    return (
        f"step {waiting.step_key} waits for a slot of pool {waiting.pool!r}, held by "
        f"{', '.join(held_by) or 'no run (the limit may be 0)'}"
    )


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


class _PoolReportingExecutor(dg.Executor):
    """Runs `inner`; after each of Dagster's "Step blocked by limit for pool" events, logs at
    WARNING who holds the pool (the orchestrating process is the only run code that runs while
    a step waits, so this is where a run without a daemon can say it)."""

    def __init__(self, inner: dg.Executor) -> None:
        self._inner = inner

    @property
    def retries(self) -> Any:
        return self._inner.retries

    @property
    def step_dependency_config(self) -> Any:
        return self._inner.step_dependency_config

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[dg.DagsterEvent]:
        run_id = plan_context.run_id
        for event in self._inner.execute(plan_context, execution_plan):
            yield event
            pool = _blocking_pool(event)
            if pool is not None and event.step_key is not None:
                waiting = PoolStep(pool, run_id, event.step_key)
                step_context = plan_context.for_step(execution_plan.get_step_by_key(event.step_key))
                step_context.log.warning(
                    _wait_line(plan_context.instance, waiting, slot_holders(plan_context.instance))
                )


def _blocking_pool(event: dg.DagsterEvent) -> str | None:
    """The pool named by Dagster's "step blocked by limit for pool" engine event, else None."""
    if not event.is_engine_event or not (event.message or "").startswith(
        ("Step blocked by limit for pool", "Step still blocked by limit for pool")
    ):
        return None
    pool = event.engine_event_data.metadata.get("pool")
    return pool.value if isinstance(pool, dg.PoolMetadataValue) else None


def pool_reporting(
    executor: dg.ExecutorDefinition, default_config: dict[str, Any] | None = None
) -> dg.ExecutorDefinition:
    """`executor` (same name and config, or another default config) whose runs name the holders
    of a pool they wait for."""
    create = executor.executor_creation_fn
    if create is None:
        raise ValueError(f"executor {executor.name!r} has no creation function")
    config_schema = executor.config_schema
    if default_config is not None:
        config_schema = dg.Field(
            config_schema.config_type, default_value=default_config, is_required=False
        )
    return dg.ExecutorDefinition(
        name=executor.name,
        config_schema=config_schema,
        requirements=executor.get_requirements,
        executor_creation_fn=lambda init_context: _PoolReportingExecutor(create(init_context)),
        description=executor.description,
    )


pool_reporting_executor = pool_reporting(
    dg.multi_or_in_process_executor, default_config={"in_process": {}}
)
"""The platform's default executor. In process by default: a run is a chain of steps (one
partition's stages) whose per-slide work already runs in the `workers` pool, so steps share the
run's process and pool instead of paying a process start-up and a new pool each. Run config
`execution: {config: {multiprocess: {}}}` runs each step in its own process."""
