"""One build of a partition at a time: every step that writes a sub-dataset's outputs
(raw_download, standardize_and_tile, cpia_mini) holds that partition's lock
(`core/locks.py`) while it runs, and `training_shards` holds its export's (`shards-<variant>`).

A second build of the same partition (a second `dagster asset materialize`, a UI click while
the automation builds it) waits, logging which run and process hold it, or fails at once with
`when_busy: fail`. Different partitions never wait for each other. Under the daemon the run
queue already keeps runs of one partition apart (`instance.py`: a tag concurrency limit on
`dagster/partition`); `dagster asset materialize` does not go through the queue, this does.

Set per run: `resources: {partition_locks: {config: {when_busy: fail}}}`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import dagster as dg
from pydantic import Field

from cpia_assets.core.locks import STALE_AFTER_S, LockBusy, LockLost, exclusive, partition_lock
from cpia_assets.defs.resources import CpiaStore

RESOURCE_KEY = "partition_locks"


class PartitionLocks(dg.ConfigurableResource):
    """Locks on the partitions' outputs (module docstring)."""

    when_busy: Literal["wait", "fail"] = Field(
        default="wait",
        description=(
            "When another build holds the partition: `wait` for it (logging the run and process "
            "that hold it), or `fail` the step at once naming them."
        ),
    )
    stale_after_s: float = Field(
        default=STALE_AFTER_S,
        description=(
            "A holder on another host (shared data folder) whose heartbeat stopped this long "
            "ago is taken over; a dead holder on this host is taken over at once."
        ),
    )

    @contextmanager
    def hold(
        self, context: dg.AssetExecutionContext, store: CpiaStore, name: str | None = None
    ) -> Iterator[None]:
        """Hold the lock `name` (default: `context`'s partition key) for the block; a step that
        may not wait, or whose lock was taken over meanwhile, fails (`dg.Failure`)."""
        key = name or context.partition_key
        step = context.op_execution_context.op.name
        try:
            with exclusive(
                partition_lock(store.layout.root, key),
                run_id=context.run_id,
                what=f"step {step}",
                when_busy=self.when_busy,
                on_event=lambda message: context.log.warning(f"[{key}] partition lock: {message}"),
                stale_after_s=self.stale_after_s,
            ):
                yield
        except (LockBusy, LockLost) as exc:
            raise dg.Failure(f"partition {key!r}: {exc}") from exc
