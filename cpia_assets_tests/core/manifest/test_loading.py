"""`load_manifest`: incremental loads of the per-partition Parquet records into DuckDB, bad
files recorded and retried, the writer and readers sharing the file lock."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from cpia_assets.core.fsutil import write_parquet_atomic
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest.database import ManifestUnavailableError, open_manifest
from cpia_assets.core.manifest.loading import LOADER_STAGE, load_manifest
from cpia_assets.core.manifest.queries import (
    failures,
    table_i,
)
from cpia_assets_tests.support.manifest_data import DataFolder, loaded_at


def test_full_load_reads_every_partition_file(data: DataFolder) -> None:
    report = load_manifest(data.layout, data.catalog)
    assert report.rows == {"tiles": 22, "rejected_tiles": 2, "roi_images": 4, "slides": 2,
                           "raw_files": 6, "failures": 1, "skipped": 0, "mini_images": 2,
                           "mini_selection": 4}  # fmt: skip
    assert len(report.loaded) == 15 and report.unchanged == 0 and not report.problems
    assert report.reloaded_partitions == ["wsi-breast", "wsi-colon", "roi-blood"]
    with open_manifest(data.layout) as con:
        per_partition = dict(
            con.execute("SELECT subdataset, count(*) FROM tiles GROUP BY ALL").fetchall()
        )
        assert per_partition == {"wsi-breast": 12, "wsi-colon": 6, "roi-blood": 4}
        runs = con.execute("SELECT DISTINCT run_id, code_version FROM tiles").fetchall()
        assert runs == [("run-tiles-1", "tiles-v3")]
        origin = con.execute(
            "SELECT DISTINCT manifest_file FROM slides WHERE subdataset = 'wsi-colon'"
        ).fetchall()
        assert origin == [("manifests/wsi-colon/slides.parquet",)]


def test_second_load_without_changes_touches_nothing(loaded: DataFolder) -> None:
    before = loaded_at(loaded.layout)
    report = load_manifest(loaded.layout, loaded.catalog)
    assert report.loaded == () and report.removed == () and report.unchanged == 15
    assert report.reloaded_partitions == []
    assert report.rows["tiles"] == 22
    assert loaded_at(loaded.layout) == before


def test_changed_partition_is_reloaded_alone(loaded: DataFolder) -> None:
    layout = loaded.layout
    before = loaded_at(layout)
    tiles_file = layout.manifest_file("wsi-colon", "tiles")
    kept = pl.read_parquet(tiles_file).filter(pl.col("scale") != "S")
    kept = kept.with_columns(run_id=pl.lit("run-tiles-2"))
    write_parquet_atomic(kept, tiles_file)
    report = load_manifest(layout, loaded.catalog)
    assert [file.path for file in report.loaded] == ["manifests/wsi-colon/tiles.parquet"]
    assert report.reloaded_partitions == ["wsi-colon"]
    assert report.unchanged_partitions == ["wsi-breast", "roi-blood"]
    assert report.rows["tiles"] == 21
    after = loaded_at(layout)
    changed = {file for file in after if after[file] != before[file]}
    assert changed == {"manifests/wsi-colon/tiles.parquet"}
    with open_manifest(layout) as con:
        runs = con.execute(
            "SELECT subdataset, run_id, count(*) FROM tiles GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        colon = table_i(con).filter(pl.col("organ") == "colon")
    assert runs == [("roi-blood", "run-tiles-1", 4), ("wsi-breast", "run-tiles-1", 12),
                    ("wsi-colon", "run-tiles-2", 5)]  # fmt: skip
    assert colon.select("WSIs-XL", "WSIs-S", "total").row(0) == (1, 0, 5)


def test_removed_files_and_partitions_leave_the_manifest(loaded: DataFolder) -> None:
    layout = loaded.layout
    layout.manifest_file("wsi-colon", "failures-standardized_wsi").unlink()
    smaller = replace(loaded.catalog, subdatasets=loaded.catalog.subdatasets[:2])
    report = load_manifest(layout, smaller)
    assert "manifests/wsi-colon/failures-standardized_wsi.parquet" in report.removed
    assert report.rows["failures"] == 0
    assert report.rows["tiles"] == 18 and report.rows["roi_images"] == 0
    assert set(report.touched) == {"wsi-colon", "roi-blood"}
    assert report.reloaded_partitions == ["wsi-colon"]
    with open_manifest(layout) as con:
        totals = table_i(con).filter(pl.col("organ").is_in(["blood", "Total"]))
    assert totals.select("organ", "sub-datasets", "total").rows() == [
        ("blood", 0, 0), ("Total", 2, 18),
    ]  # fmt: skip


def test_unusable_file_is_recorded_kept_and_retried(loaded: DataFolder) -> None:
    layout = loaded.layout
    slides_file = layout.manifest_file("wsi-breast", "slides")
    good = slides_file.read_bytes()
    slides_file.write_bytes(b"not parquet at all")
    tiles_file = layout.manifest_file("roi-blood", "tiles")
    as_text = pl.read_parquet(tiles_file).with_columns(pl.col("x").cast(pl.String))
    write_parquet_atomic(as_text, tiles_file)
    report = load_manifest(layout, loaded.catalog)
    assert report.loaded == ()
    reasons = {problem["file"]: problem["reason"] for problem in report.problems}
    assert "not a readable Parquet file" in reasons["manifests/wsi-breast/slides.parquet"]
    assert "x is VARCHAR, expected INTEGER" in reasons["manifests/roi-blood/tiles.parquet"]
    assert report.rows["slides"] == 2 and report.rows["tiles"] == 22  # earlier rows kept
    with open_manifest(layout) as con:
        recorded = failures(con, stages=[LOADER_STAGE])
    assert sorted(recorded["file"]) == sorted(reasons)
    slides_file.write_bytes(good)
    retried = load_manifest(layout, loaded.catalog)
    assert [file.path for file in retried.loaded] == ["manifests/wsi-breast/slides.parquet"]
    assert [problem["file"] for problem in retried.problems] == [
        "manifests/roi-blood/tiles.parquet"
    ]


def corrupt_first_page(path: Path) -> None:
    """Overwrite the start of the first column's first page (its header and data) with junk,
    leaving the footer, and so the schema and row count, intact."""
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    offset = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 48] = b"\xff" * 48
    path.write_bytes(bytes(data))


def test_file_with_corrupt_data_pages_is_skipped_and_the_rest_loads(data: DataFolder) -> None:
    layout = data.layout
    tiles_file = layout.manifest_file("roi-blood", "tiles")
    good = tiles_file.read_bytes()
    corrupt_first_page(tiles_file)
    assert pq.ParquetFile(tiles_file).metadata.num_rows == 4  # the footer still reads
    with pytest.raises(pl.exceptions.ComputeError):
        pl.read_parquet(tiles_file)
    report = load_manifest(layout, data.catalog)
    bad = "manifests/roi-blood/tiles.parquet"
    assert [problem["file"] for problem in report.problems] == [bad]
    assert "unreadable Parquet data" in report.problems[0]["reason"]
    assert bad not in [file.path for file in report.loaded] and len(report.loaded) == 14
    assert report.rows["tiles"] == 18 and report.rows["roi_images"] == 4
    with open_manifest(layout) as con:
        per_partition = dict(
            con.execute("SELECT subdataset, count(*) FROM tiles GROUP BY ALL").fetchall()
        )
        recorded = failures(con, stages=[LOADER_STAGE])
    assert per_partition == {"wsi-breast": 12, "wsi-colon": 6}
    assert recorded["file"].to_list() == [bad] and recorded["subdataset"].to_list() == ["roi-blood"]
    tiles_file.write_bytes(good)
    fixed = load_manifest(layout, data.catalog)
    assert [file.path for file in fixed.loaded] == [bad] and not fixed.problems
    assert fixed.rows["tiles"] == 22 and fixed.reloaded_partitions == ["roi-blood"]


def test_missing_columns_load_as_null_and_extra_columns_are_ignored(loaded: DataFolder) -> None:
    layout = loaded.layout
    tiles_file = layout.manifest_file("roi-blood", "tiles")
    drifted = pl.read_parquet(tiles_file).drop("upscaled").with_columns(note=pl.lit("extra"))
    write_parquet_atomic(drifted, tiles_file)
    report = load_manifest(layout, loaded.catalog)
    assert not report.problems and report.rows["tiles"] == 22
    with open_manifest(layout) as con:
        flags = con.execute(
            "SELECT DISTINCT upscaled FROM tiles WHERE subdataset = 'roi-blood'"
        ).fetchall()
    assert flags == [(None,)]


def test_writer_waits_for_a_reader_to_let_go(loaded: DataFolder) -> None:
    layout = loaded.layout
    hold = (
        "import duckdb, sys, time; con = duckdb.connect(sys.argv[1], read_only=True); "
        "print('open', flush=True); time.sleep(2); con.close()"
    )
    reader = subprocess.Popen([sys.executable, "-c", hold, str(layout.duckdb_path)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
    with pytest.raises(ManifestUnavailableError, match="could not open for writing"):
        load_manifest(layout, loaded.catalog, wait_s=0)
    report = load_manifest(layout, loaded.catalog, wait_s=60)
    assert reader.wait() == 0
    assert report.rows["tiles"] == 22


def test_reading_a_missing_manifest_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestUnavailableError, match=r"manifest\.duckdb does not exist"):
        open_manifest(DataLayout(tmp_path))
