"""A partition built in-process, and what a partition run leaves on disk in a form two runs can
be compared by: file digests and record tables without the per-run columns or the data folder's
own path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg
import polars as pl

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.digests import VOLATILE_COLUMNS
from cpia_assets.definitions import PARTITIONED_ASSETS, build_definitions

OUTPUT_FOLDERS = ("standardized", "cpia", "cpia-mini")


def build_partition(
    catalog_path: Path, data: Path, key: str, **workers: object
) -> dg.ExecuteInProcessResult:
    """Every partitioned asset of `key`, on a fresh test instance; `workers`: `workers=N` or
    `dask_scheduler=ADDRESS`."""
    defs = build_definitions(load_catalog(catalog_path), data, **workers)
    with dg.instance_for_test() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            partition_key=key,
            asset_selection=[dg.AssetKey(name) for name in PARTITIONED_ASSETS],
            instance=instance,
        )
    assert result.success
    return result


def output_files(data: Path) -> dict[str, str]:
    """sha256 of every file under the output folders, by path relative to `data`."""
    return {
        str(path.relative_to(data)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in OUTPUT_FOLDERS
        for path in sorted((data / folder).rglob("*"))
        if path.is_file()
    }


def partition_records(data: Path, key: str) -> dict[str, pl.DataFrame]:
    """The partition's record tables, sorted, without run columns, paths made relative."""
    frames = {}
    for path in sorted((data / "manifests" / key).glob("*.parquet")):
        frame = pl.read_parquet(path)
        frame = frame.drop([name for name in VOLATILE_COLUMNS if name in frame.columns])
        text = [name for name in frame.columns if frame[name].dtype == pl.String]
        frame = frame.with_columns(pl.col(text).str.replace_all(str(data), "", literal=True))
        frames[path.stem] = frame.sort(frame.columns, nulls_last=True)
    return frames


def materialization_of(result: dg.ExecuteInProcessResult, asset: str) -> dg.AssetMaterialization:
    """The materialization of `asset` (both assets come from the `standardize_and_tile` step)."""
    (found,) = [
        event
        for event in result.get_asset_materialization_events()
        if event.asset_key == dg.AssetKey(asset)
    ]
    return found.materialization


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    evaluations = [
        event.asset_check_evaluation_data
        for event in result.all_events
        if event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    return {evaluation.check_name: evaluation.passed for evaluation in evaluations}
