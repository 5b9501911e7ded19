"""Data versions from content: what Dagster compares to mark downstream partitions stale, and
the stale/missing partitions the instance sees (Dagster's own resolver, an internal API that the
UI uses too)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.definitions.temporal_context import TemporalContext
from dagster._time import get_current_datetime

from cpia_assets.core.digests import content_digest, files_digest, records_digest
from cpia_assets.core.layout import DataLayout

DIGEST_LENGTH = 16


def records_data_version(
    layout: DataLayout, key: str, tables: Sequence[str], settings: object
) -> dg.DataVersion:
    """The data version of partition `key`: a sha256 over the record tables the step wrote
    (sorted, without run ids and other per-run columns) and its effective settings."""
    return dg.DataVersion(records_digest(layout, key, tables, settings)[:DIGEST_LENGTH])


def files_data_version(paths: Sequence[Path], settings: object) -> dg.DataVersion:
    """The data version of an output made of files (shards' index, an encoder): their bytes
    and the effective settings."""
    return dg.DataVersion(files_digest(paths, settings)[:DIGEST_LENGTH])


def content_data_version(content: object) -> dg.DataVersion:
    """The data version of results held in memory (JSON-like values and settings dataclasses)."""
    return dg.DataVersion(content_digest(content)[:DIGEST_LENGTH])


def partitions_to_rebuild(
    instance: dg.DagsterInstance,
    graph: BaseAssetGraph,
    assets: Sequence[str],
    partition_keys: Sequence[str] | None = None,
) -> list[str]:
    """The partitions in which one of `assets` is missing or stale (new code version, changed
    upstream data version): what the UI marks, and what a rebuild must launch. Unpartitioned
    assets: `[""]` when one of them needs a rebuild, else `[]`. `graph`: the definitions' asset
    graph (`defs.resolve_asset_graph()`, or a schedule context's `repository_def.asset_graph`)."""
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, loading_context=view)
    keys = [dg.AssetKey(name) for name in assets]
    return [
        partition
        for partition in (partition_keys or [""])
        if any(resolver.get_status(key, partition or None) != StaleStatus.FRESH for key in keys)
    ]
