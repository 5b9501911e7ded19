"""Content digests of a partition's output records, the basis of Dagster data versions.

Two runs that produce the same records with the same effective settings give the same digest, so
downstream partitions go stale only when an output really changed. Columns that differ between
identical reruns (which run wrote the row, with which code version, when a file was fetched) are
left out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import polars as pl

from cpia_assets.core.layout import DataLayout

VOLATILE_COLUMNS = ("run_id", "code_version", "fetched_at")


def records_digest(layout: DataLayout, key: str, tables: Sequence[str], settings: object) -> str:
    """sha256 over the partition's record tables (rows sorted, volatile columns dropped) and the
    settings; a table whose file is missing counts as absent, not as an error."""
    digest = hashlib.sha256()
    for table in sorted(tables):
        path = layout.manifest_file(key, table)
        digest.update(f"table {table}\n".encode())
        if not path.exists():
            digest.update(b"absent\n")
            continue
        frame = pl.read_parquet(path)
        frame = frame.drop([name for name in VOLATILE_COLUMNS if name in frame.columns])
        frame = frame.select(sorted(frame.columns))
        digest.update(frame.sort(frame.columns, nulls_last=True).write_csv().encode())
    digest.update(settings_text(settings).encode())
    return digest.hexdigest()


def files_digest(paths: Sequence[Path], settings: object) -> str:
    """sha256 over the bytes of output files (by name) and the settings; missing files count as
    absent."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"file {path.name}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest() if path.exists() else b"absent")
    digest.update(settings_text(settings).encode())
    return digest.hexdigest()


def content_digest(content: object) -> str:
    """sha256 of JSON-like values (dataclasses included), independent of key order."""
    return hashlib.sha256(settings_text(content).encode()).hexdigest()


def settings_text(settings: object) -> str:
    """A canonical JSON text of effective settings: dataclasses (also nested in mappings or
    lists) as their fields, anything else JSON cannot write as its string."""
    return json.dumps(settings, sort_keys=True, default=_plain)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)
