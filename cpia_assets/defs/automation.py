"""Declarative automation: what the `cpia_automation` sensor materializes by itself.

- `source_files` (each entry and local file listing) is observed every `SOURCE_CRON` tick.
- Per sub-dataset (`raw_download` ... `cpia_mini`): a partition that is new (a catalog entry
  added), whose code version changed, or one of whose inputs got a new *data version* (for
  `raw_download`: a changed catalog entry or source file listing) is built.
  Unlike `AutomationCondition.eager()`, an upstream rerun that produced the same records (the
  same data version) launches nothing.
- `tile_manifest` follows its partitions, debounced: at most once per `MANIFEST_CRON` tick, when
  any partition was updated since its last load and none is still running, so a backfill over
  100 partitions loads the manifest a few times, not 100.
- `training_shards`, `ssl_checkpoint` and `downstream_eval` (long, GPU) are launched by hand.

The sensor is declared RUNNING, so it starts with the daemon (`make ui`, `dagster-daemon run`).
Stop it in the UI (Automation -> cpia_automation -> toggle off) or with
`dagster sensor stop cpia_automation -m cpia_assets.definitions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

AutomationCondition = dg.AutomationCondition
SENSOR_NAME = "cpia_automation"
MANIFEST_CRON = "*/10 * * * *"
SOURCE_CRON = "*/10 * * * *"


def observe_sources(cron: str = SOURCE_CRON) -> dg.AutomationCondition:
    """Observe `source_files` when never observed, then at every cron tick (a cheap listing)."""
    return (
        (AutomationCondition.missing() | AutomationCondition.cron_tick_passed(cron))
        .since_last_handled()
        .with_label(f"observe when unobserved and on {cron}")
    )


def rebuild_on_change() -> dg.AutomationCondition:
    """New partition, new code version, or an input whose data version changed; never while
    an input is missing or running, or the partition itself is running."""
    input_changed = AutomationCondition.any_deps_match(
        (
            AutomationCondition.data_version_changed()
            & ~AutomationCondition.executed_with_root_target()
        )
        | AutomationCondition.will_be_requested()
    )
    trigger = (
        AutomationCondition.newly_missing()
        | AutomationCondition.code_version_changed()
        | input_changed
    )
    return (
        trigger.since_last_handled()
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    ).with_label("rebuild on change")


def refresh_after_partitions(cron: str = MANIFEST_CRON) -> dg.AutomationCondition:
    """At a cron tick, once some partition was updated since the last refresh and none runs."""
    return (
        AutomationCondition.cron_tick_passed(cron).since_last_handled()
        & (
            AutomationCondition.any_deps_updated() | AutomationCondition.code_version_changed()
        ).since_last_handled()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    ).with_label(f"refresh after partitions ({cron})")


def with_automation(
    assets: Sequence[dg.AssetsDefinition], partitioned: Sequence[str], aggregate: str
) -> list[dg.AssetsDefinition]:
    """`assets` with the conditions above attached to the named asset keys."""
    conditions = {name: rebuild_on_change() for name in partitioned}
    conditions[aggregate] = refresh_after_partitions()

    def attach(spec: dg.AssetSpec) -> dg.AssetSpec:
        condition = conditions.get(spec.key.to_user_string())
        return (
            spec if condition is None else spec.replace_attributes(automation_condition=condition)
        )

    return [asset.map_asset_specs(attach) for asset in assets]


def automation_sensor(assets: Sequence[str]) -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        SENSOR_NAME,
        target=dg.AssetSelection.assets(*assets),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=(
            "Builds new or changed sub-dataset partitions and refreshes the manifest after "
            "them. Stop it here or with `dagster sensor stop cpia_automation`."
        ),
    )
