"""Content-based data versions: what a partition's step wrote, not when it ran."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass

import dagster as dg
import polars as pl

from cpia_assets.core.layout import DataLayout

RUN_COLUMNS = ("run_id", "code_version")
"""Record columns that change between identical reruns."""


def records_data_version(
    layout: DataLayout, key: str, tables: Sequence[str], settings: object
) -> dg.DataVersion:
    """sha256 over the partition's record `tables` (read back sorted by every column, without
    `RUN_COLUMNS`; a missing file counts as empty) and the effective `settings`."""
    digest = hashlib.sha256()
    for table in tables:
        digest.update(f"\0{table}\0".encode())
        path = layout.manifest_file(key, table)
        if path.exists():
            frame = pl.read_parquet(path).drop(RUN_COLUMNS, strict=False)
            digest.update(frame.sort(frame.columns, nulls_last=True).write_csv().encode())
    digest.update(json.dumps(settings, default=_plain, sort_keys=True).encode())
    return dg.DataVersion(digest.hexdigest())


def _plain(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)
