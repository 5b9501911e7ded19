"""Real Dagster runs of the partitioned assets on a small synthetic catalog."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import openslide
import polars as pl
import pytest
from PIL import Image

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.definitions import PARTITIONED_ASSETS, build_definitions
from cpia_assets_tests.support.outputs import materialization_of
from cpia_assets_tests.support.small_catalog import mini_run_config

TILE_NAME = re.compile(r"^(?P<slide>.+)-(?P<size>3840|960|384|96)-(?P<x>\d+)-(?P<y>\d+)$")


@pytest.fixture
def pipeline(small_build):
    """Every partition of the small catalog materialized once, in process (`small_build`)."""
    return small_build["layout"], small_build["results"], small_build["instance"]


def _tiles(layout: DataLayout, key: str) -> pl.DataFrame:
    return pl.read_parquet(layout.manifest_file(key, "tiles"))


def test_every_partition_succeeds_and_records_run_ids(pipeline) -> None:
    layout, results, _ = pipeline
    for key, result in results.items():
        assert result.success, key
        tiles = _tiles(layout, key)
        assert tiles["run_id"].unique().to_list() == [result.run_id]
        assert tiles["code_version"].unique().to_list() == ["3"]
        assert tiles["cut_from"].unique().to_list() == (["resampled"] if "wsi" in key else [None])
        assert tiles["subdataset"].unique().to_list() == [key]


def test_wsi_partitions_give_named_tiles_on_disk_at_the_paper_ratios(pipeline) -> None:
    layout, _, _ = pipeline
    for key in ("wsi-40x", "wsi-20x"):
        tiles = _tiles(layout, key)
        counts = dict(tiles.group_by("scale").len().iter_rows())
        assert counts["XL"] >= 1, key
        assert counts["L"] <= 16 * counts["XL"]
        assert counts["M"] <= 100 * counts["XL"]
        assert counts["S"] <= 160 * counts["XL"]
        assert counts["M"] > counts["L"] > counts["XL"]
        for row in tiles.iter_rows(named=True):
            match = TILE_NAME.match(row["image_name"])
            assert match, row["image_name"]
            assert int(match["size"]) == row["size_px"]
            assert (int(match["x"]), int(match["y"])) == (row["x"], row["y"])
            path = layout.root / row["path"]
            folder = {"XL": "L"}.get(row["scale"], row["scale"])
            assert path.parent == layout.cpia_dir / folder / key
            assert path.stat().st_size == row["bytes"]
        # One file per row, nothing else in the scale folders.
        on_disk = {p.stem for f in ("L", "M", "S") for p in (layout.cpia_dir / f / key).glob("*")}
        assert on_disk == set(tiles["image_name"])
        sample = tiles.filter(pl.col("scale") == "S").row(0, named=True)
        with Image.open(layout.root / sample["path"]) as image:
            assert image.size == (96, 96)


def test_standardized_slides_read_back_at_the_target_mpp(pipeline) -> None:
    layout, _, _ = pipeline
    slides = pl.read_parquet(layout.manifest_file("wsi-20x", "slides"))
    assert slides.height == 2
    for row in slides.iter_rows(named=True):
        assert row["mpp_x"] == pytest.approx(0.5)
        assert row["scale_factor"] == pytest.approx(0.5 / 0.491, rel=1e-3)
        with openslide.OpenSlide(layout.root / row["standardized_file"]) as slide:
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.491, rel=1e-4)
            assert slide.dimensions == (row["std_width"], row["std_height"])


def test_roi_partitions_keep_labels_splits_and_scales(pipeline) -> None:
    layout, _, _ = pipeline
    cells = _tiles(layout, "roi-cells")
    assert cells.height == 2 * (2 + 1 + 1)
    assert set(cells["scale"]) == {"S"}
    assert set(cells["label"]) == {"lymphocyte", "neutrophil"}
    assert dict(cells.group_by("split").len().iter_rows()) == {"train": 4, "val": 2, "test": 2}
    tissue = _tiles(layout, "roi-tissue")
    assert dict(tissue.group_by("scale").len().iter_rows()) == {"L": 8, "M": 8}
    for row in tissue.iter_rows(named=True):
        assert row["x"] is None
        with Image.open(layout.root / row["path"]) as image:
            assert image.size == (384, 384)
            assert image.mode == "RGB"


def test_rerun_reuses_finished_work(copy_of_small_build) -> None:
    built = copy_of_small_build
    layout = built["layout"]
    before = _tiles(layout, "wsi-20x").drop("run_id").sort("image_name")
    result = built["job"].execute_in_process(
        partition_key="wsi-20x",
        asset_selection=[dg.AssetKey(name) for name in PARTITIONED_ASSETS],
        instance=built["instance"],
        run_config=mini_run_config(),
    )
    assert result.success
    for asset in ("standardized_wsi", "scale_tiles"):
        materialization = materialization_of(result, asset)
        assert materialization.metadata["reused_from_earlier_runs"].value == 2, asset
    after = _tiles(layout, "wsi-20x").drop("run_id").sort("image_name")
    assert after.equals(before)


def test_scale_tiles_metadata_counts_rejections_by_test(pipeline) -> None:
    layout, results, _ = pipeline
    for key in ("wsi-40x", "wsi-20x"):
        metadata = materialization_of(results[key], "scale_tiles").metadata
        rejected = pl.read_parquet(layout.manifest_file(key, "rejected_tiles"))
        xl = rejected.filter(pl.col("scale") == "XL")
        counts = {name: metadata[f"rejected_{name}"].value
                  for name in ("xl_thumbnail", "xl_tissue", "sub_tiles")}  # fmt: skip
        assert counts["xl_thumbnail"] == xl.filter(pl.col("blur").is_null()).height
        assert counts["xl_tissue"] == xl.filter(pl.col("blur").is_not_null()).height
        assert counts["sub_tiles"] == rejected.height - xl.height > 0  # glass between islands
        assert sum(counts.values()) == metadata["rejected_candidates"].value


def test_catalog_tissue_threshold_overrides_reach_scale_tiles(tmp_path: Path) -> None:
    """An entry's `tissue_thresholds` replace the run config's: here no XL tile can pass."""
    catalog_file = tmp_path / "catalog.yaml"
    catalog_file.write_text(
        "subdatasets:\n"
        "- key: strict-wsi\n  name: Strict\n  kind: wsi\n  organ: colon\n"
        "  tissue_thresholds: {xl_min_tissue: 1.0, saturation: 0.1}\n"
        "  source: {type: synthetic, recipe: wsi, slides: "
        "[{name: S-0001, width: 4000, height: 3950, mpp: 0.5, seed: 6}]}\n"
    )
    defs = build_definitions(load_catalog(catalog_file), tmp_path / "data", workers=1)
    with dg.instance_for_test() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            partition_key="strict-wsi",
            asset_selection=[dg.AssetKey(name) for name in PARTITIONED_ASSETS],
            instance=instance,
        )
    assert result.success
    metadata = materialization_of(result, "scale_tiles").metadata
    used = metadata["tissue_thresholds"].value
    assert used["xl_min_tissue"] == 1.0 and used["saturation"] == 0.1
    assert used["tile_min_tissue"] == 0.1  # not overridden: the run config's default
    assert metadata["images"].value == 0
    assert metadata["rejected_xl_tissue"].value == metadata["rejected_candidates"].value >= 1


def test_partitions_show_their_catalog_facts_in_the_ui(pipeline) -> None:
    _, results, _ = pipeline
    metadata = results["wsi-40x"].asset_materializations_for_node("raw_download")[0].metadata
    assert metadata["licence"].value == "CC0 1.0" and metadata["redistributable"].value == "yes"
    assert metadata["organ"].value == metadata["table_i_row"].value == "breast"
    assert metadata["landing_page"].value.startswith("https://openslide")
    unknown = results["wsi-20x"].asset_materializations_for_node("raw_download")[0].metadata
    assert unknown["licence"].value == unknown["redistributable"].value == "unknown"
