from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import openslide
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cpia_assets.core import schema
from cpia_assets.core.catalog import TABLE_I_ORGANS, Catalog, SubDataset, load_catalog
from cpia_assets.core.fsutil import sha256_file, write_parquet_atomic
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest import (
    LOADER_STAGE,
    ManifestUnavailableError,
    TileFilter,
    built_vs_published,
    count_tiles,
    failures,
    load_manifest,
    markdown_table,
    open_manifest,
    query_tiles,
    table_i,
    trace_image,
)
from cpia_assets.core.mosaic import EMPTY_CELL, UNREADABLE, MosaicStyle, build_mosaic
from cpia_assets.definitions import build_definitions
from cpia_assets.defs.instance import DUCKDB_POOL as POOL
from cpia_assets.defs.instance import ensure_pool_limits, prepare_instance

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
SLIDE = TESTDATA / "CMU-1-Small-Region.svs"  # Aperio, 2220x2967, MPP 0.499

RUN_IDS = {
    "raw_download": "run-raw-1",
    "standardized_wsi": "run-std-1",
    "scale_tiles": "run-tiles-1",
    "cpia_mini": "run-mini-1",
}
CODE_VERSIONS = {"raw_download": "raw-v1", "standardized_wsi": "std-v2", "scale_tiles": "tiles-v3",
                 "cpia_mini": "mini-v1"}  # fmt: skip
EDGE = {"XL": 3840, "L": 960, "M": 384, "S": 96}
PIXELS_PER_SAVED_PX = 16  # saved images are the slide region shrunk to keep the tests small
TISSUE_ORIGIN = (700, 900)  # level-0 pixel of the slide where tile (0, 0) starts: tissue there


# ---------------------------------------------------------------------------------------------
# A data folder with real images cut from a real slide, and per-partition Parquet records
# written the way the Dagster shell writes them (schema columns + run id + code version).
# test_integrity.py and test_cli.py build on it too.


@dataclass(frozen=True)
class DataFolder:
    layout: DataLayout
    catalog: Catalog


def entry(key: str, kind: str, organ: str, **extra: Any) -> SubDataset:
    return SubDataset(key=key, name=key.upper(), kind=kind, organ=organ,
                      source={"type": "manual"}, **extra)  # fmt: skip


def write_records(
    layout: DataLayout,
    key: str,
    table: str,
    rows: Iterable[Mapping[str, Any]],
    columns: Mapping[str, pl.DataType],
    asset: str,
) -> Path:
    frame = schema.frame(rows, columns).with_columns(
        run_id=pl.lit(RUN_IDS[asset]), code_version=pl.lit(CODE_VERSIONS[asset])
    )
    return write_parquet_atomic(frame, layout.manifest_file(key, table))


def save_image(layout: DataLayout, key: str, scale: str, name: str, pixels: Image.Image) -> Path:
    path = layout.image_dir(scale, key) / f"{name}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels.convert("RGB").save(path, format="JPEG", quality=85)
    return path


def tile_row(
    layout: DataLayout, key: str, slide: openslide.OpenSlide, stem: str, scale: str, x: int, y: int,
    *, parent: str | None, in_mini: bool, sha256: str,
) -> dict[str, Any]:  # fmt: skip
    size = EDGE[scale] // PIXELS_PER_SAVED_PX
    origin = (TISSUE_ORIGIN[0] + x * size, TISSUE_ORIGIN[1] + y * size)
    region = slide.read_region(origin, 0, (size, size)).convert("RGB")
    name = f"{stem}-{EDGE[scale]}-{x}-{y}"
    path = save_image(layout, key, scale, name, region)
    means = np.asarray(region, dtype=np.float32).mean(axis=(0, 1))
    return {
        "image_name": name, "subdataset": key, "kind": "wsi", "scale": scale, "size_px": size,
        "x": x, "y": y, "source_file": f"raw/{key}/{stem}.svs", "source_sha256": sha256,
        "standardized_file": f"standardized/{key}/{stem}.tiff", "path": layout.relative(path),
        "parent_image": parent, "split": "none", "bytes": path.stat().st_size, "upscaled": False,
        "mean_r": means[0], "mean_g": means[1], "mean_b": means[2], "tissue_fraction": 0.8,
        "saturation": 0.3, "blur": 12.0, "in_mini": in_mini,
    }  # fmt: skip


def write_wsi_partition(
    layout: DataLayout, key: str, stem: str, xl_cells: list[tuple[int, int]]
) -> None:
    """Per XL tile: 2 L and 2 M children, and one S child of the first M tile."""
    raw = layout.raw_dir(key) / f"{stem}.svs"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.symlink_to(SLIDE)
    sha256 = sha256_file(raw)
    tiles = []
    with openslide.OpenSlide(SLIDE) as slide:
        for x, y in xl_cells:
            common = {"in_mini": True, "sha256": sha256}
            xl = tile_row(layout, key, slide, stem, "XL", x, y, parent=None, **common)
            tiles.append(xl)
            for scale, ratio in (("L", 4), ("M", 10)):
                for dx in (0, 1):
                    child = (ratio * x + dx, ratio * y)
                    tiles.append(tile_row(layout, key, slide, stem, scale, *child,
                                          parent=xl["image_name"], **common))  # fmt: skip
            first_m = tiles[-2]
            cell = (4 * first_m["x"], 4 * first_m["y"])
            tiles.append(tile_row(layout, key, slide, stem, "S", *cell,
                                  parent=first_m["image_name"], **common))  # fmt: skip
        width, height = slide.dimensions
    rejected = {**tiles[0], "image_name": f"{stem}-3840-9-9", "x": 9, "y": 9, "path": None,
                "bytes": None, "tissue_fraction": 0.01, "in_mini": False}  # fmt: skip
    slide_row = {
        "source_file": f"raw/{key}/{stem}.svs", "source_bytes": SLIDE.stat().st_size,
        "source_sha256": sha256, "vendor": "aperio", "width": width, "height": height,
        "mpp_x": 0.499, "mpp_y": 0.499, "mpp_origin": "openslide", "level": 0,
        "level_downsample": 1.0, "scale_factor": 0.499 / 0.491, "resampled": True,
        "target_mpp": 0.491, "standardized_file": f"standardized/{key}/{stem}.tiff",
        "std_width": round(width * 0.499 / 0.491), "std_height": round(height * 0.499 / 0.491),
    }  # fmt: skip
    raw_row = {"rel_path": f"{stem}.svs", "bytes": SLIDE.stat().st_size, "sha256": sha256,
               "source": f"https://example.org/{stem}.svs"}  # fmt: skip
    write_records(layout, key, "raw_files", [raw_row], schema.RAW_FILES, "raw_download")
    write_records(layout, key, "slides", [slide_row], schema.SLIDES, "standardized_wsi")
    write_records(layout, key, "tiles", tiles, schema.TILES, "scale_tiles")
    write_records(layout, key, "rejected_tiles", [rejected], schema.TILES, "scale_tiles")


def write_roi_partition(layout: DataLayout, key: str, count: int) -> None:
    """`count` S-scale ROI images from PNG sources in <label>/ folders; train ones in Mini
    (flagged in the tiles, and as cpia_mini's records, with the Mini images linked)."""
    raw_rows, images = [], []
    with openslide.OpenSlide(SLIDE) as slide:
        for index in range(count):
            label = ("lymphocyte", "neutrophil")[index % 2]
            split = ("train", "train", "val", "test")[index % 4]
            crop = slide.read_region((500 + 40 * index, 700), 0, (40, 40)).convert("RGB")
            source = layout.raw_dir(key) / label / f"cell_{index}.png"
            source.parent.mkdir(parents=True, exist_ok=True)
            crop.save(source)
            sha256 = sha256_file(source)
            relative = f"{label}/cell_{index}.png"
            url = f"https://example.org/{relative}"
            raw_rows.append({"rel_path": relative, "bytes": source.stat().st_size,
                             "sha256": sha256, "source": url})  # fmt: skip
            path = save_image(layout, key, "S", f"cell_{index}", crop.resize((32, 32)))
            images.append({
                "image_name": f"cell_{index}", "subdataset": key, "kind": "roi", "scale": "S",
                "size_px": 32, "source_file": layout.relative(source), "source_sha256": sha256,
                "path": layout.relative(path), "label": label, "split": split,
                "bytes": path.stat().st_size, "upscaled": True, "in_mini": split == "train",
            })  # fmt: skip
    write_records(layout, key, "raw_files", raw_rows, schema.RAW_FILES, "raw_download")
    write_records(layout, key, "roi_images", images, schema.TILES, "standardized_wsi")
    write_records(layout, key, "tiles", images, schema.TILES, "scale_tiles")
    selection, mini = [], []
    for image in images:
        reason = "selected" if image["in_mini"] else "val/test split"
        selection.append({**image, "mini_reason": reason})
        if image["in_mini"]:
            linked = layout.mini_image_dir("S", key) / Path(image["path"]).name
            linked.parent.mkdir(parents=True, exist_ok=True)
            os.link(layout.root / image["path"], linked)
            mini.append(
                {**image, "source_tile": image["image_name"], "path": layout.relative(linked)}
            )
    write_records(layout, key, "mini_selection", selection, schema.MINI_SELECTION, "cpia_mini")
    write_records(layout, key, "mini_images", mini, schema.MINI_IMAGES, "cpia_mini")


def build_data_folder(root: Path) -> DataFolder:
    """Three partitions: wsi-breast (2 XL tiles), wsi-colon (1 XL tile, one failed slide) and
    roi-blood (4 S-scale ROI images), 22 kept images in all."""
    layout = DataLayout(root)
    catalog = Catalog(
        path=root / "catalog.yaml",
        subdatasets=(
            entry(
                "wsi-breast", "wsi", "breast", published_counts={"XL": 4, "L": 16, "M": 40, "S": 2}
            ),
            entry("wsi-colon", "wsi", "colon"),  # nothing published
            entry(
                "roi-blood",
                "roi",
                "blood",
                scale="S",
                labelled=True,
                published_counts={"M": 0, "S": 8},
            ),
        ),
    )
    write_wsi_partition(layout, "wsi-breast", "BRS-0001", [(0, 0), (1, 0)])
    write_wsi_partition(layout, "wsi-colon", "COL-0001", [(0, 1)])
    failure = {"file": "raw/wsi-colon/COL-0002.svs", "stage": "standardized_wsi",
               "reason": "raw/wsi-colon/COL-0002.svs: no MPP in the slide's metadata"}  # fmt: skip
    write_records(layout, "wsi-colon", "failures-standardized_wsi", [failure], schema.FAILURES,
                  "standardized_wsi")  # fmt: skip
    write_records(layout, "wsi-breast", "failures-scale_tiles", [], schema.FAILURES, "scale_tiles")
    write_roi_partition(layout, "roi-blood", 4)
    return DataFolder(layout, catalog)


@pytest.fixture
def data(tmp_path: Path) -> DataFolder:
    return build_data_folder(tmp_path / "data")


@pytest.fixture
def loaded(data: DataFolder) -> DataFolder:
    load_manifest(data.layout, data.catalog)
    return data


def loaded_at(layout: DataLayout) -> dict[str, Any]:
    with duckdb.connect(str(layout.duckdb_path), read_only=True) as con:
        return dict(con.execute("SELECT file, loaded_at FROM manifest_files").fetchall())


# ---------------------------------------------------------------------------------------------
# Loading


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


# ---------------------------------------------------------------------------------------------
# Queries


def test_table_i_counts_per_organ_with_totals(loaded: DataFolder) -> None:
    with open_manifest(loaded.layout) as con:
        full = table_i(con)
        mini = table_i(con, mini_only=True)
        view = con.sql("SELECT * FROM table_i").pl()
    assert full.equals(view)
    assert full["organ"].to_list() == [*TABLE_I_ORGANS, "Total"]
    columns = ["sub-datasets", "WSIs-XL", "WSIs-L", "ROIs-L", "WSIs-M", "ROIs-M", "WSIs-S",
               "ROIs-S", "total"]  # fmt: skip
    rows = {row[0]: list(row[1:]) for row in full.select("organ", *columns).iter_rows()}
    assert rows["breast"] == [1, 2, 4, 0, 4, 0, 2, 0, 12]
    assert rows["colon"] == [1, 1, 2, 0, 2, 0, 1, 0, 6]
    assert rows["blood"] == [1, 0, 0, 0, 0, 0, 0, 4, 4]
    assert rows["liver"] == [0] * 9
    assert rows["Total"] == [3, 3, 6, 0, 6, 0, 3, 4, 22]
    assert mini.filter(pl.col("organ") == "Total")["ROIs-S"].item() == 2  # the train images


def test_load_copies_the_mini_selection_onto_the_tiles(data: DataFolder) -> None:
    key = "roi-blood"
    selection = data.layout.manifest_file(key, "mini_selection")
    # cpia_mini's selection wins over the flags in scale_tiles' records
    rows = pl.read_parquet(selection).with_columns(
        in_mini=pl.col("image_name") == "cell_2",
        mini_reason=pl.when(pl.col("image_name") == "cell_2")
        .then(pl.lit("selected"))
        .otherwise(pl.lit("excluded for evaluation")),
    )
    write_parquet_atomic(rows, selection)
    load_manifest(data.layout, data.catalog)
    with open_manifest(data.layout) as con:
        flags = con.sql(
            "SELECT image_name, in_mini, mini_reason FROM tiles WHERE subdataset = ? ORDER BY 1",
            params=[key],
        ).fetchall()
        rejected = con.sql("SELECT DISTINCT in_mini, mini_reason FROM rejected_tiles").fetchall()
    assert flags == [
        ("cell_0", False, "excluded for evaluation"),
        ("cell_1", False, "excluded for evaluation"),
        ("cell_2", True, "selected"),
        ("cell_3", False, "excluded for evaluation"),
    ]
    assert rejected == [(False, "blank")]


def test_built_vs_published_per_subdataset_and_scale(data: DataFolder) -> None:
    unbuilt = entry("wsi-lung", "wsi", "lung", published_counts={"XL": 10})
    catalog = replace(data.catalog, subdatasets=(*data.catalog.subdatasets, unbuilt))
    load_manifest(data.layout, catalog)
    with open_manifest(data.layout) as con:
        compared = built_vs_published(con)
        built_only = built_vs_published(con, built_only=True)
    assert compared.columns[:6] == ["subdataset", "organ", "kind", "built_xl", "published_xl",
                                    "ratio_xl"]  # fmt: skip
    rows = {row["subdataset"]: row for row in compared.to_dicts()}
    assert list(rows) == ["roi-blood", "wsi-breast", "wsi-colon", "wsi-lung"]
    breast = rows["wsi-breast"]
    assert [breast[f"built_{scale}"] for scale in ("xl", "l", "m", "s")] == [2, 4, 4, 2]
    assert [breast[f"ratio_{scale}"] for scale in ("xl", "l", "m", "s")] == [0.5, 0.25, 0.1, 1.0]
    blood = rows["roi-blood"]
    assert (blood["built_s"], blood["published_s"], blood["ratio_s"]) == (4, 8, 0.5)
    assert (blood["built_m"], blood["published_m"], blood["ratio_m"]) == (0, 0, None)
    assert (blood["built_xl"], blood["published_xl"], blood["ratio_xl"]) == (0, None, None)
    colon = rows["wsi-colon"]
    assert colon["built_xl"] == 1 and colon["published_xl"] is None and colon["ratio_xl"] is None
    assert (rows["wsi-lung"]["built_xl"], rows["wsi-lung"]["ratio_xl"]) == (0, 0.0)
    assert built_only["subdataset"].to_list() == ["roi-blood", "wsi-breast", "wsi-colon"]


def test_markdown_table_has_header_rule_and_grouped_numbers() -> None:
    frame = pl.DataFrame(
        {"organ": ["breast", "a|b"], "images": [1234567, 0], "ratio": [0.123456, None]}
    )
    assert markdown_table(frame).splitlines() == [
        "| organ | images | ratio |",
        "|---|---:|---:|",
        "| breast | 1,234,567 | 0.1235 |",
        "| a\\|b | 0 |  |",
    ]


def test_query_tiles_filters_are_bound_parameters(loaded: DataFolder) -> None:
    with open_manifest(loaded.layout) as con:
        train = query_tiles(con, TileFilter(splits=("train",)))
        assert train["image_name"].to_list() == ["cell_0", "cell_1"]
        assert set(train["organ"]) == {"blood"}
        m_tiles = query_tiles(con, TileFilter(subdatasets=("wsi-breast",), scales=("M",)), limit=3)
        assert m_tiles.height == 3 and set(m_tiles["scale"]) == {"M"}
        by_organ = query_tiles(con, TileFilter(organs=("colon", "blood"), scales=("S",)))
        assert sorted(by_organ["subdataset"].unique()) == ["roi-blood", "wsi-colon"]
        assert query_tiles(con, TileFilter(scales=("S' OR '1'='1",))).height == 0
        assert query_tiles(con, TileFilter(mini_only=True, kinds=("roi",))).height == 2
        # the rejected candidates are not kept images
        assert query_tiles(con).height == 22


def test_count_tiles_groups_by_allowed_columns(loaded: DataFolder) -> None:
    with open_manifest(loaded.layout) as con:
        counts = count_tiles(con, TileFilter(kinds=("wsi",)), by=("organ", "scale"))
        assert counts.filter(pl.col("organ") == "breast").rows() == [
            ("breast", "L", 4), ("breast", "M", 4), ("breast", "S", 2), ("breast", "XL", 2),
        ]  # fmt: skip
        assert count_tiles(con, by=()).item() == 22
        with pytest.raises(ValueError, match="cannot group by"):
            count_tiles(con, by=("path; DROP TABLE tiles",))


def test_failures_lists_recorded_files(loaded: DataFolder) -> None:
    with open_manifest(loaded.layout) as con:
        listed = failures(con, subdatasets=["wsi-colon"])
    assert listed.select("stage", "file", "run_id").rows() == [
        ("standardized_wsi", "raw/wsi-colon/COL-0002.svs", "run-std-1")
    ]
    assert "no MPP" in listed["reason"].item()


def test_lineage_walks_a_tile_back_to_its_source_sha256(loaded: DataFolder) -> None:
    layout = loaded.layout
    with open_manifest(layout) as con:
        s_tile = trace_image(con, "BRS-0001-96-40-0")
        roi = trace_image(con, "cell_2", subdataset="roi-blood")
        assert trace_image(con, "no-such-image").height == 0
    assert s_tile["step"].to_list() == [
        "source file", "standardized slide", "XL tile", "M tile", "S tile",
    ]  # fmt: skip
    assert s_tile["item"].to_list() == [
        "raw/wsi-breast/BRS-0001.svs", "standardized/wsi-breast/BRS-0001.tiff",
        "BRS-0001-3840-1-0", "BRS-0001-384-10-0", "cpia/S/wsi-breast/BRS-0001-96-40-0.jpg",
    ]  # fmt: skip
    assert s_tile["sha256"][0] == sha256_file(layout.raw_dir("wsi-breast") / "BRS-0001.svs")
    assert s_tile["run_id"].to_list() == [
        "run-raw-1", "run-std-1", "run-tiles-1", "run-tiles-1", "run-tiles-1",
    ]  # fmt: skip
    assert s_tile["code_version"].to_list()[:3] == ["raw-v1", "std-v2", "tiles-v3"]
    assert roi.select("step", "asset", "run_id").rows() == [
        ("source file", "raw_download", "run-raw-1"),
        ("ROI image", "standardized_wsi", "run-std-1"),
    ]
    assert roi["sha256"][0] == sha256_file(layout.raw_dir("roi-blood") / "lymphocyte/cell_2.png")


# ---------------------------------------------------------------------------------------------
# Mosaic


def test_mosaic_has_a_row_per_subdataset_and_a_column_per_scale(loaded: DataFolder) -> None:
    layout = loaded.layout
    (layout.root / "cpia/L/wsi-colon/COL-0001-3840-0-1.jpg").write_bytes(b"truncated")
    style = MosaicStyle(samples=2, thumb_px=32, gap_px=4, label_px=100, header_px=20)
    with open_manifest(layout) as con:
        png = build_mosaic(con, layout, layout.root / "mosaic.png", style=style)
    with Image.open(png) as picture:
        image = picture.convert("RGB")
    cell_px = 2 * (32 + 4) + 4
    row_px = 32 + 8
    assert image.size == (100 + 4 * cell_px, 20 + 3 * row_px)

    def pixel(row: int, column: int, slot: int) -> tuple[int, int, int]:
        left = 100 + column * cell_px + 4 + slot * 36 + 16
        return image.getpixel((left, 20 + row * row_px + 4 + 16))  # type: ignore[return-value]

    # rows in Table I organ order: blood (roi-blood), breast (wsi-breast), colon (wsi-colon)
    assert pixel(0, 0, 0) == EMPTY_CELL  # no XL tiles in an ROI sub-dataset
    assert pixel(0, 3, 0) != EMPTY_CELL  # its S images
    assert all(pixel(1, column, 0) not in (EMPTY_CELL, UNREADABLE) for column in range(4))
    assert pixel(2, 0, 0) == UNREADABLE and pixel(2, 0, 1) == EMPTY_CELL  # one XL, broken


# ---------------------------------------------------------------------------------------------
# Dagster: real runs of the whole asset graph on small synthetic partitions


@dataclass(frozen=True)
class PipelineRun:
    layout: DataLayout
    defs: dg.Definitions
    instance: dg.DagsterInstance
    partition_runs: dict[str, str]  # partition key -> run id


def materialize_manifest(run: PipelineRun) -> dg.ExecuteInProcessResult:
    """The refresh_manifest job: tile_manifest and its four checks."""
    result = run.defs.resolve_job_def("refresh_manifest").execute_in_process(instance=run.instance)
    assert result.success
    return result


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    evaluations = [
        event.asset_check_evaluation_data
        for event in result.all_events
        if event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    return {evaluation.check_name: evaluation.passed for evaluation in evaluations}


def manifest_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [materialization] = result.asset_materializations_for_node("tile_manifest")
    return {key: value.value for key, value in materialization.metadata.items()}


@pytest.fixture(scope="module")
def pipeline(
    small_catalog_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineRun]:
    """Every partition of the lead's small test catalog materialized in-process, once."""
    layout = DataLayout(tmp_path_factory.mktemp("pipeline") / "data")
    catalog = load_catalog(small_catalog_path)
    defs = build_definitions(catalog, layout.root, workers=1)
    job = defs.resolve_job_def("build_subdatasets")
    with dg.instance_for_test() as instance:
        ensure_pool_limits(instance)
        runs = {}
        for key in catalog.keys:
            result = job.execute_in_process(partition_key=key, instance=instance)
            assert result.success, key
            runs[key] = result.run_id
        yield PipelineRun(layout, defs, instance, runs)


def test_pool_limit_is_set_once_on_the_instance(pipeline: PipelineRun) -> None:
    storage = pipeline.instance.event_log_storage
    assert storage.get_concurrency_info(POOL).slot_count == 1
    ensure_pool_limits(pipeline.instance)
    assert storage.get_concurrency_info(POOL).slot_count == 1
    assert pipeline.defs.resolve_assets_def("tile_manifest").op.pool == POOL


def test_tile_manifest_loads_real_partitions_and_passes_its_checks(pipeline: PipelineRun) -> None:
    layout = pipeline.layout
    result = materialize_manifest(pipeline)
    metadata = manifest_metadata(result)
    parquet_rows = sum(
        pl.read_parquet(layout.manifest_file(key, "tiles")).height
        for key in pipeline.partition_runs
    )
    assert metadata["rows_tiles"] == parquet_rows > 0
    assert metadata["partitions_reloaded"] == list(pipeline.partition_runs)
    assert metadata["partitions_unchanged"] == 0
    note, _, *table = metadata["table_i"].splitlines()
    assert "paper's Table I" in note and "later, larger release" in note
    assert table[0].startswith("| organ | sub-datasets | sub-datasets (paper v1) | WSIs-XL |")
    assert table[-1].startswith("| Total | 4 | 103 |")
    assert table[-1].endswith(f"| {parquet_rows:,} | 21,427,877 |")
    with Image.open(metadata["mosaic"]) as mosaic:
        assert mosaic.format == "PNG" and mosaic.height > 4 * 96
    assert metadata["mosaic_preview"].startswith("![sample images")
    compared = metadata["built_vs_published"].splitlines()
    assert compared[0].startswith("| subdataset | organ | kind | built_xl | published_xl |")
    assert sorted(line.split(" | ")[0][2:] for line in compared[2:]) == sorted(
        pipeline.partition_runs
    )
    assert metadata["duckdb"] == str(layout.duckdb_path)
    assert check_results(result) == {
        "rows_have_files": True, "no_orphan_files": True, "ratios_within_spec": True,
        "unique_names_per_folder": True, "raw_files_accounted": True,
        "mini_ratios": True,
    }  # fmt: skip


def test_lineage_of_a_real_tile_reaches_its_source_sha256(pipeline: PipelineRun) -> None:
    materialize_manifest(pipeline)
    layout = pipeline.layout
    with open_manifest(layout) as con:
        [(name, source)] = con.execute(
            "SELECT image_name, source_file FROM tiles WHERE subdataset = 'wsi-20x' "
            "AND scale = 'S' ORDER BY image_name LIMIT 1"
        ).fetchall()
        steps = trace_image(con, name)
    assert steps["step"].to_list() == [
        "source file", "standardized slide", "XL tile", "M tile", "S tile",
    ]  # fmt: skip
    assert steps["item"][0] == source
    assert steps["sha256"][0] == sha256_file(layout.root / source)
    assert set(steps["run_id"]) == {pipeline.partition_runs["wsi-20x"]}
    assert steps["code_version"].to_list() == ["1", "2", "2", "2", "2"]  # raw_download, then ours


def test_a_rematerialized_partition_is_reloaded_alone(pipeline: PipelineRun) -> None:
    materialize_manifest(pipeline)
    rerun = pipeline.defs.resolve_job_def("build_subdatasets").execute_in_process(
        partition_key="roi-cells",
        instance=pipeline.instance,
        asset_selection=[dg.AssetKey("scale_tiles")],
    )
    assert rerun.success
    metadata = manifest_metadata(materialize_manifest(pipeline))
    assert metadata["partitions_reloaded"] == ["roi-cells"]
    assert metadata["partitions_unchanged"] == 3
    assert metadata["files_loaded"] == 2  # tiles and rejected_tiles
    with open_manifest(pipeline.layout) as con:
        runs = dict(con.execute("SELECT DISTINCT subdataset, run_id FROM tiles").fetchall())
    assert runs == {**pipeline.partition_runs, "roi-cells": rerun.run_id}


def test_the_checks_fail_on_a_deleted_file_and_on_an_orphan(pipeline: PipelineRun) -> None:
    materialize_manifest(pipeline)
    image = next((pipeline.layout.cpia_dir / "M" / "wsi-40x").glob("*.jpg"))
    content = image.read_bytes()
    orphan = pipeline.layout.cpia_dir / "S" / "roi-cells" / "stray.jpg"
    image.unlink()
    orphan.write_bytes(content)
    try:
        checks = check_results(materialize_manifest(pipeline))
    finally:
        image.write_bytes(content)
        orphan.unlink()
    assert checks == {
        "rows_have_files": False, "no_orphan_files": False, "ratios_within_spec": True,
        "unique_names_per_folder": True, "raw_files_accounted": True,
        "mini_ratios": True,
    }  # fmt: skip
    assert check_results(materialize_manifest(pipeline))["rows_have_files"]


# ---------------------------------------------------------------------------------------------
# Dagster: partitions and the manifest materialized at the same time, as separate CLI runs
# (multiprocess executor, persistent instance with the platform's dagster.yaml)

CONCURRENT_CATALOG = """\
subdatasets:
- {key: wsi-a, name: WSI A, kind: wsi, organ: breast, source: {type: synthetic, recipe: wsi,
   slides: [{name: A-0001, width: 4000, height: 3950, mpp: 0.5, seed: 1}]}}
- {key: wsi-b, name: WSI B, kind: wsi, organ: lung, source: {type: synthetic, recipe: wsi,
   slides: [{name: B-0001, width: 4000, height: 3950, mpp: 0.5, seed: 2}]}}
- {key: roi-a, name: ROI A, kind: roi, organ: blood, scale: S, source: {type: synthetic,
   recipe: roi, layout: folders, classes: [a, b], per_split: {train: 2, val: 1, test: 1}, seed: 3}}
- {key: roi-b, name: ROI B, kind: roi, organ: skin, scale: M, source: {type: synthetic,
   recipe: roi, layout: folders, classes: [a, b], per_split: {train: 2, val: 1, test: 1}, seed: 4}}
"""
# Multiprocess executor; step processes fork from one that imported the code once.
FORKSERVER = '{"execution": {"config": {"multiprocess": {"start_method": {"forkserver": {}}}}}}'
LOCK_ERRORS = re.compile(r"could not set lock|conflicting lock|database is locked", re.I)
DUCKDB_STEPS = {"tile_manifest", "manifest_checks"}


def test_partition_runs_beside_manifest_runs_lose_nothing(tmp_path: Path) -> None:
    home, data, catalog_file = tmp_path / "home", tmp_path / "data", tmp_path / "catalog.yaml"
    catalog_file.write_text(CONCURRENT_CATALOG)
    prepare_instance(home)
    env = {**os.environ, "DAGSTER_HOME": str(home), "CPIA_CATALOG": str(catalog_file),
           "CPIA_DATA_DIR": str(data), "CPIA_WORKERS": "1"}  # fmt: skip

    def materialize(*args: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "dagster", "asset", "materialize",
                   "-m", "cpia_assets.definitions", "--config-json", FORKSERVER, *args]  # fmt: skip
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    keys = load_catalog(catalog_file).keys
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # Two manifest runs (each: tile_manifest and its 5 checks) start with the 4 partition
        # runs; they compete for the pool; a last one loads whatever they missed.
        concurrent = [
            *(materialize("--select", "raw_download,standardized_wsi,scale_tiles",
                          "--partition", key) for key in keys),
            materialize("--select", "tile_manifest"),
            materialize("--select", "tile_manifest"),
        ]  # fmt: skip
        outputs = [run.communicate()[0] for run in concurrent]
        last = materialize("--select", "tile_manifest")
        outputs.append(last.communicate()[0])
        assert [run.returncode for run in [*concurrent, last]] == [0] * 7, "\n".join(outputs)
        assert not [
            line for out in outputs for line in out.splitlines() if LOCK_ERRORS.search(line)
        ]

        runs = instance.get_runs()  # newest first
        manifest_runs = [run for run in runs if dg.AssetKey("tile_manifest") in run.asset_selection]
        partition_runs = [run for run in runs if run not in manifest_runs]
        assert len(manifest_runs) == 3 and len(partition_runs) == 4
        # The manifest steps waited for the pool's one slot (on SQLite storage two steps that
        # claim it at the same instant may both get it; then DuckDB's file lock makes one wait).
        blocked = [record for run in manifest_runs for record in instance.all_logs(run.run_id)
                   if f"blocked by limit for pool {POOL}" in (record.message or "")]  # fmt: skip
        assert blocked
        spans = list(_step_spans(instance, manifest_runs[1:], DUCKDB_STEPS))
        partition_steps = {"raw_download", "standardize_and_tile"}
        writing = list(_step_spans(instance, partition_runs, partition_steps))
        assert len(spans) == 4 and len(writing) == 8
        assert any(start < other_end and other_start < end for start, end in spans
                   for other_start, other_end in writing)  # fmt: skip
        checks = instance.all_logs(
            manifest_runs[0].run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        )
        results = [event.dagster_event.asset_check_evaluation_data for event in checks]
        assert {result.check_name: result.passed for result in results} == {
            "rows_have_files": True, "no_orphan_files": True, "ratios_within_spec": True,
            "unique_names_per_folder": True, "raw_files_accounted": True,
            "mini_ratios": True,
        }  # fmt: skip

    layout = DataLayout(data)
    with open_manifest(layout) as con:
        loaded = dict(con.execute("SELECT subdataset, count(*) FROM tiles GROUP BY ALL").fetchall())
        run_ids = dict(con.execute("SELECT DISTINCT subdataset, run_id FROM tiles").fetchall())
    written = {key: pl.read_parquet(layout.manifest_file(key, "tiles")) for key in keys}
    assert loaded == {key: frame.height for key, frame in written.items()}
    assert run_ids == {key: frame["run_id"][0] for key, frame in written.items()}


def _step_spans(
    instance: dg.DagsterInstance, runs: Iterable[dg.DagsterRun], steps: set[str]
) -> Iterator[tuple[float, float]]:
    """(start, end) timestamps of the named steps in these runs."""
    for run in runs:
        started: dict[str, float] = {}
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event is None or event.step_key not in steps:
                continue
            if event.event_type_value == "STEP_START":
                started[event.step_key] = record.timestamp
            elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                yield started.pop(event.step_key), record.timestamp
