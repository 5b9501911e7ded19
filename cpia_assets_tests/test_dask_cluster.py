"""Slide-level fan-out over a real Dask cluster (worker processes over TCP on 127.0.0.1) gives
the same files and manifest rows, byte for byte, as the local process pool."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from distributed import LocalCluster

from cpia_assets.core.catalog import load_catalog
from cpia_assets.core.digests import VOLATILE_COLUMNS
from cpia_assets.definitions import PARTITIONED_ASSETS, build_definitions

KEY = "wsi-20x"  # two small synthetic slides of the test catalog
OUTPUT_FOLDERS = ("standardized", "cpia", "cpia-mini")


def _build(catalog_path: Path, data: Path, **workers: object) -> dg.ExecuteInProcessResult:
    defs = build_definitions(load_catalog(catalog_path), data, **workers)
    with dg.instance_for_test() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            partition_key=KEY,
            asset_selection=[dg.AssetKey(name) for name in PARTITIONED_ASSETS],
            instance=instance,
        )
    assert result.success
    return result


def _files(data: Path) -> dict[str, str]:
    return {
        str(path.relative_to(data)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in OUTPUT_FOLDERS
        for path in sorted((data / folder).rglob("*"))
        if path.is_file()
    }


def _records(data: Path) -> dict[str, pl.DataFrame]:
    frames = {}
    for path in sorted((data / "manifests" / KEY).glob("*.parquet")):
        frame = pl.read_parquet(path)
        frame = frame.drop([name for name in VOLATILE_COLUMNS if name in frame.columns])
        frames[path.stem] = frame.sort(frame.columns, nulls_last=True)
    return frames


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, protocol="tcp",
    ) as cluster:  # fmt: skip
        yield cluster


def test_dask_cluster_gives_the_local_pool_results_byte_for_byte(
    small_catalog_path: Path, tmp_path: Path, cluster: LocalCluster
) -> None:
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    _build(small_catalog_path, tmp_path / "local", workers=2)
    on_dask = _build(
        small_catalog_path, tmp_path / "dask", dask_scheduler=cluster.scheduler_address
    )
    tiles = on_dask.asset_materializations_for_node("scale_tiles")[0].metadata["images"].value
    assert tiles > 0
    local_files, dask_files = _files(tmp_path / "local"), _files(tmp_path / "dask")
    assert any(name.startswith("cpia/M/") for name in local_files)
    assert dask_files == local_files
    local_records, dask_records = _records(tmp_path / "local"), _records(tmp_path / "dask")
    assert set(dask_records) == set(local_records) >= {"slides", "tiles", "mini_images"}
    for table, frame in local_records.items():
        absolute = [c for c in frame.columns if frame[c].dtype == pl.String]
        local = frame.with_columns(pl.col(absolute).str.replace_all(str(tmp_path / "local"), ""))
        dask = dask_records[table].with_columns(
            pl.col(absolute).str.replace_all(str(tmp_path / "dask"), "")
        )
        assert dask.equals(local), table
