"""Scheduled backfills: every partition re-run weekly (a full sweep; finished work is reused), the
manifest hourly when a partition changed."""

from __future__ import annotations

import dagster as dg

from cpia_assets.defs.versions import partitions_to_rebuild


def build_schedules(
    subdatasets_job: dg.UnresolvedAssetJobDefinition,
    manifest_job: dg.UnresolvedAssetJobDefinition,
) -> list[dg.ScheduleDefinition]:
    @dg.schedule(
        job=subdatasets_job,
        cron_schedule="0 2 * * 6",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Weekly backfill of every sub-dataset; slides done with the same source bytes "
        "and settings are skipped, so only new or changed inputs cost time.",
    )
    def weekly_backfill(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        keys = subdatasets_job.partitions_def.get_partition_keys()  # type: ignore[union-attr]
        stamp = context.scheduled_execution_time.strftime("%Y-%m-%d")
        return [dg.RunRequest(run_key=f"{stamp}:{key}", partition_key=key) for key in keys]

    @dg.schedule(
        job=manifest_job,
        cron_schedule="30 * * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Hourly load of changed partitions into manifest.duckdb (one writer); no "
        "run while the manifest is up to date with its partitions.",
    )
    def manifest_refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        graph = context.repository_def.asset_graph
        if not partitions_to_rebuild(context.instance, graph, ["tile_manifest"]):
            return dg.SkipReason("tile_manifest is up to date: no partition changed since its load")
        return dg.RunRequest()

    return [weekly_backfill, manifest_refresh]
