"""What keeps a load of the later release's 149 M images within time and memory: files of one
table with the same columns load in one scan without `union_by_name`, files that differ still
load together correctly, and every manifest connection runs under a memory limit."""

from __future__ import annotations

import duckdb
import polars as pl
import pytest

from cpia_assets.core.fsutil import write_parquet_atomic
from cpia_assets.core.manifest import loading
from cpia_assets.core.manifest.database import MEMORY_LIMIT_ENV, open_manifest
from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets_tests.support.manifest_data import DataFolder


def test_files_with_other_columns_load_beside_the_rest(
    data: DataFolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = data.layout
    tiles_file = layout.manifest_file("roi-blood", "tiles")
    drifted = pl.read_parquet(tiles_file).drop("upscaled").with_columns(note=pl.lit("extra"))
    write_parquet_atomic(drifted, tiles_file)
    scans: list[tuple[str, int]] = []
    insert = loading._insert_batch

    def counted(con, layout, table, batch):  # type: ignore[no-untyped-def]
        scans.append((table.name, len(batch)))
        return insert(con, layout, table, batch)

    monkeypatch.setattr(loading, "_insert_batch", counted)
    report = load_manifest(layout, data.catalog)
    assert not report.problems and report.rows["tiles"] == 22
    assert sorted(n for table, n in scans if table == "tiles") == [1, 2]  # two column sets
    assert [n for table, n in scans if table == "slides"] == [2]  # one scan for both files
    with open_manifest(layout) as con:
        flags = dict(
            con.execute("SELECT subdataset, bool_or(upscaled IS NULL) FROM tiles GROUP BY ALL")
            .fetchall()
        )  # fmt: skip
    assert flags == {"roi-blood": True, "wsi-breast": False, "wsi-colon": False}


def test_manifest_connections_run_under_the_memory_limit(
    loaded: DataFolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "123MB")
    with duckdb.connect(config={"memory_limit": "123MB"}) as scratch:
        [(expected,)] = scratch.execute("SELECT current_setting('memory_limit')").fetchall()
    with open_manifest(loaded.layout) as con:
        [(limit,)] = con.execute("SELECT current_setting('memory_limit')").fetchall()
    assert limit == expected
