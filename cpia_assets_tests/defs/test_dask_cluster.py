"""Slide-level fan-out over a real Dask cluster (worker processes over TCP on 127.0.0.1) gives
the same files and manifest rows, byte for byte, as the local process pool."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import LocalCluster

from cpia_assets_tests.support.outputs import (
    build_partition,
    materialization_of,
    output_files,
    partition_records,
)

KEY = "wsi-20x"  # two small synthetic slides of the test catalog


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
    build_partition(small_catalog_path, tmp_path / "local", KEY, workers=2)
    on_dask = build_partition(
        small_catalog_path, tmp_path / "dask", KEY, dask_scheduler=cluster.scheduler_address
    )
    metadata = materialization_of(on_dask, "scale_tiles").metadata
    assert metadata["images"].value > 0
    assert "XL kept" in metadata["slide_thumbnails"].value  # the UI's per-slide thumbnails
    local_files = output_files(tmp_path / "local")
    assert any(name.startswith("cpia/M/") for name in local_files)
    assert output_files(tmp_path / "dask") == local_files
    local = partition_records(tmp_path / "local", KEY)
    on_cluster = partition_records(tmp_path / "dask", KEY)
    assert set(on_cluster) == set(local) >= {"slides", "tiles", "mini_images"}
    for table, frame in local.items():
        assert on_cluster[table].equals(frame), table
