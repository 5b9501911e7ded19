"""The manifest's queries: Table I, built vs published, tiles by filter, counts, failures,
lineage, markdown tables."""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest

from cpia_assets.core.catalog.fields import TABLE_I_ORGANS
from cpia_assets.core.fsutil import sha256_file, write_parquet_atomic
from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets.core.manifest.queries import (
    TileFilter,
    built_vs_published,
    count_tiles,
    failures,
    markdown_table,
    query_tiles,
    table_i,
    trace_image,
)
from cpia_assets_tests.support.manifest_data import DataFolder, entry


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
