"""Glue between a stage's rows and the per-partition Parquet files the manifest loads."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import dagster as dg
import polars as pl
from pydantic import Field, create_model

from cpia_assets.core import schema
from cpia_assets.core.fsutil import write_parquet_atomic
from cpia_assets.core.layout import DataLayout


def write_records(
    context: dg.AssetExecutionContext,
    layout: DataLayout,
    table: str,
    rows: Iterable[Mapping[str, Any]],
    columns: Mapping[str, pl.DataType],
    *,
    asset: dg.AssetKey | None = None,
) -> Path:
    """Write `rows` as manifests/<partition>/<table>.parquet, stamped with run id and code
    version (of `asset`: needed in a multi-asset, else the context's asset)."""
    frame = schema.frame(rows, columns).with_columns(
        run_id=pl.lit(context.run.run_id, pl.String),
        code_version=pl.lit(code_version(context, asset), pl.String),
    )
    return write_parquet_atomic(frame, layout.manifest_file(context.partition_key, table))


def write_failures(
    context: dg.AssetExecutionContext,
    layout: DataLayout,
    failures: Sequence[Mapping[str, Any]],
    *,
    asset: dg.AssetKey | None = None,
) -> None:
    """Record this stage's failures (an empty file clears those of an earlier run)."""
    asset = asset or context.asset_key
    table = failures_table(asset)
    write_records(context, layout, table, failures, schema.FAILURES, asset=asset)


def failures_table(asset: dg.AssetKey) -> str:
    return f"failures-{asset.to_user_string()}"


def read_records(layout: DataLayout, key: str, table: str) -> list[dict[str, Any]]:
    path = layout.manifest_file(key, table)
    if not path.exists():
        raise dg.Failure(f"{path} is missing: materialize the upstream asset for partition {key!r}")
    return pl.read_parquet(path).to_dicts()


def code_version(context: dg.AssetExecutionContext, asset: dg.AssetKey | None = None) -> str:
    versions = context.assets_def.code_versions_by_key
    return versions.get(asset or context.asset_key) or "unversioned"


def progress_logger(context: dg.AssetExecutionContext) -> Callable[[str], None]:
    prefix = f"[{context.partition_key}] "
    return lambda line: context.log.info(prefix + line)


def failures_markdown(
    failures: Sequence[Mapping[str, Any]], limit: int = 20, total: int | None = None
) -> str:
    """The first `limit` failures as a table; `total`: how many there are when `failures` holds
    only the first of them."""
    if not failures:
        return "No failures."
    lines = ["| file | reason |", "|---|---|"]
    lines += [f"| {f['file']} | {str(f['reason']).replace('|', '/')} |" for f in failures[:limit]]
    more = (total if total is not None else len(failures)) - min(limit, len(failures))
    if more > 0:
        lines.append(f"| ... | {more} more in the manifest's failures table |")
    return "\n".join(lines)


def config_class(settings_cls: type, name: str) -> type[dg.Config]:
    """A Dagster run-config class with the same fields and defaults as a core settings dataclass.

    The core owns the knobs and their defaults; the UI's launchpad shows them unchanged. Nested
    settings dataclasses become nested config classes; tuples (immutable settings) become lists,
    which Dagster's config system accepts.
    """
    hints = get_type_hints(settings_cls)
    model_fields: dict[str, Any] = {}
    for field in fields(settings_cls):
        annotation = hints[field.name]
        if is_dataclass(annotation):
            nested = config_class(annotation, name + annotation.__name__)
            model_fields[field.name] = (nested, nested())
        elif get_origin(annotation) is tuple:
            model_fields[field.name] = (list[get_args(annotation)[0]], list(field.default))
        elif field.default is MISSING:  # a mutable default such as a dict
            model_fields[field.name] = (annotation, Field(default_factory=field.default_factory))
        else:
            model_fields[field.name] = (annotation, field.default)
    return create_model(name, __base__=dg.Config, **model_fields)


def settings_from(config: dg.Config, settings_cls: type) -> Any:
    """The core settings dataclass holding a run config's values."""
    hints = get_type_hints(settings_cls)
    values = {}
    for field in fields(settings_cls):
        value = getattr(config, field.name)
        annotation = hints[field.name]
        if is_dataclass(annotation):
            value = settings_from(value, annotation)
        elif get_origin(annotation) is tuple:
            value = tuple(value)
        values[field.name] = value
    return settings_cls(**values)
