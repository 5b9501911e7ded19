from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import polars as pl
import pytest
import pyvips
from PIL import Image

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS, hamming, phash, phash_file
from cpia_assets.core.stage import StageResult
from cpia_assets.core.synthetic import he_texture
from cpia_assets.core.wsi import tiling
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slide_jobs import standardize_partition
from cpia_assets.core.wsi.tile_jobs import tile_partition
from cpia_assets.core.wsi.tiling import TilingSettings, sample_cells, tile_name
from cpia_assets.core.wsi.tissue import TissueThresholds, grid_metrics, saturation_map
from cpia_assets_tests.support.paths import TESTDATA
from cpia_assets_tests.support.slide_factory import build_slide, tissue_only

KEY = "wsi-test"
STEM = "TS-0001"


@pytest.fixture
def standardized(tmp_path: Path) -> tuple[DataLayout, list[dict]]:
    """A 0.491 um/px slide of two XL tiles, tissue on the left, glass on the right, plus a
    ragged edge; and the real CMU SVS (too small for an XL tile)."""
    layout = DataLayout(tmp_path / "data")
    raw = layout.raw_dir(KEY)
    glass = pyvips.Image.black(3900, 3900, bands=3).new_from_image([243, 242, 245])
    image = tissue_only(3840, 3900).join(glass.cast("uchar"), "horizontal")
    build_slide(raw / f"{STEM}.tiff", image.copy(interpretation="srgb"), mpp=0.491)
    (raw / "CMU-1-Small-Region.svs").symlink_to(TESTDATA / "CMU-1-Small-Region.svs")
    result = standardize_partition(
        sorted(raw.iterdir()),
        key=KEY,
        layout=layout,
        options=WsiOptions(),
        settings=StandardizeSettings(),
    )
    assert not result.failures
    return layout, result.records


def _tile(layout: DataLayout, slides: list[dict], **settings) -> StageResult:
    messages: list[str] = []
    result = tile_partition(
        slides,
        key=KEY,
        layout=layout,
        settings=TilingSettings(**settings),
        progress=messages.append,
    )
    assert len(messages) == len(slides)
    return result


def _files(layout: DataLayout) -> list[str]:
    return sorted(layout.relative(p) for p in layout.cpia_dir.rglob("*") if p.is_file())


def test_tile_names_put_the_top_left_at_size_times_index():
    assert tile_name("TCGA-A2-A0EY-01A-01-BSA", 960, 39, 6) == "TCGA-A2-A0EY-01A-01-BSA-960-39-6"


def test_s_sample_is_uniform_deterministic_and_seeded_by_name():
    cells = sample_cells("A-3840-0-0", grid=40, fraction=0.1)
    assert cells == sample_cells("A-3840-0-0", grid=40, fraction=0.1)
    assert len(set(cells)) == 160 and min(cells) >= 0 and max(cells) < 1600
    assert cells != sample_cells("A-3840-1-0", grid=40, fraction=0.1)
    rows = {cell // 40 for cell in cells}
    assert len(rows) > 30  # spread over the tile, not one corner


def test_thresholds_keep_synthetic_tissue_and_reject_its_background():
    thresholds = TissueThresholds()
    tissue = grid_metrics(
        he_texture(960, 960, seed=3, tissue_fraction=1.0).numpy(), 4, 4, thresholds
    )
    glass = grid_metrics(
        he_texture(960, 960, seed=3, tissue_fraction=0.0).numpy(), 4, 4, thresholds
    )
    # Real H&E (the shipped CMU-1 crop) has small gaps between collagen fibres.
    assert tissue["tissue_fraction"].min() > 0.8
    assert tissue["tissue_fraction"].mean() > 0.9
    assert glass["tissue_fraction"].max() < 0.01
    assert glass["mean_r"].min() > 235


def test_tissue_xl_gives_1_16_100_160_and_glass_is_rejected(standardized):
    layout, slides = standardized
    result = _tile(layout, slides)
    assert not result.failures
    kept = {}
    for row in result.records:
        kept.setdefault(row["scale"], []).append(row)
    assert {scale: len(rows) for scale, rows in kept.items()} == {
        "XL": 1,
        "L": 16,
        "M": 100,
        "S": 160,
    }
    (xl,) = kept["XL"]
    assert (xl["image_name"], xl["x"], xl["y"]) == (f"{STEM}-3840-0-0", 0, 0)
    assert xl["path"] == f"cpia/L/{KEY}/{STEM}-3840-0-0.jpg"
    assert {row["parent_image"] for row in kept["L"] + kept["M"]} == {xl["image_name"]}
    m_names = {row["image_name"] for row in kept["M"]}
    assert {row["parent_image"] for row in kept["S"]} <= m_names
    assert _files(layout) == sorted(row["path"] for row in result.records)
    (glass,) = [row for row in result.rejected if row["scale"] == "XL"]
    assert glass["image_name"] == f"{STEM}-3840-1-0" and glass["path"] is None
    assert glass["tissue_fraction"] < 0.01 and glass["mean_r"] > 235
    for row in result.records + result.rejected:
        assert row["source_file"] == f"raw/{KEY}/{STEM}.tiff"
        assert row["kind"] == "wsi" and row["subdataset"] == KEY
        assert row["size_px"] == int(row["image_name"].split("-")[-3])


TISSUE_RIGHT, TISSUE_BOTTOM = 2300, 3100
"""The patchy slide's tissue: x < 2300 and y < 3100 of its one XL tile; glass elsewhere."""


@pytest.fixture(scope="module")
def patchy(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataLayout, StageResult]:
    """One kept XL tile with glass over its right 1540 and bottom 740 pixels: blank L, M and S
    cells inside a kept XL tile, placed asymmetrically so that x and y cannot be confused."""
    layout = DataLayout(tmp_path_factory.mktemp("patchy") / "data")
    glass = [243, 242, 245]
    image = tissue_only(3900, 3900)  # a ragged edge: the standardized slide keeps one XL tile
    image = image.draw_rect(glass, TISSUE_RIGHT, 0, 3900 - TISSUE_RIGHT, 3900, fill=True)
    image = image.draw_rect(glass, 0, TISSUE_BOTTOM, 3900, 3900 - TISSUE_BOTTOM, fill=True)
    slide = build_slide(layout.raw_dir(KEY) / f"{STEM}.tiff", image, mpp=0.491)
    standardized = standardize_partition(
        [slide], key=KEY, layout=layout, options=WsiOptions(), settings=StandardizeSettings()
    )
    return layout, _tile(layout, standardized.records)


def test_blank_cells_of_a_kept_xl_are_dropped_and_s_tiles_follow_their_m(patchy):
    layout, result = patchy
    assert not result.failures
    candidates = result.records + result.rejected
    kept = {row["image_name"] for row in result.records}
    by_scale = {
        scale: [row for row in candidates if row["scale"] == scale] for scale in tiling.SCALES
    }
    assert [row["image_name"] in kept for row in by_scale["XL"]] == [True]
    for scale in ("L", "M", "S"):
        for row in by_scale[scale]:
            size = row["size_px"]
            left, top = size * row["x"], size * row["y"]
            all_glass = left >= TISSUE_RIGHT or top >= TISSUE_BOTTOM
            all_tissue = left + size <= TISSUE_RIGHT and top + size <= TISSUE_BOTTOM
            if all_glass:
                assert row["image_name"] not in kept, row["image_name"]
            if all_tissue and scale != "S":
                assert row["image_name"] in kept, row["image_name"]
        dropped = [row for row in by_scale[scale] if row["image_name"] not in kept]
        assert 0 < len(dropped) < len(by_scale[scale]), scale
    m_kept = {row["image_name"] for row in by_scale["M"] if row["image_name"] in kept}
    for row in by_scale["S"]:
        parent = tile_name(STEM, 384, row["x"] * 96 // 384, row["y"] * 96 // 384)
        assert row["parent_image"] == parent
        if row["image_name"] in kept:
            assert parent in m_kept
        elif parent in m_kept and row["tissue_fraction"] >= 0.5:
            raise AssertionError(f"{row['image_name']}: tissue under a kept M, yet dropped")
    assert _files(layout) == sorted(row["path"] for row in result.records)


def test_saved_tiles_carry_the_hash_of_their_pixels_and_rejected_ones_none(patchy):
    """Exactly the hash of the standardized slide's pixels that were encoded; near that of
    the saved JPEG."""
    layout, result = patchy
    slide = pyvips.Image.tiffload(str(layout.standardized_dir(KEY) / f"{STEM}.tiff"))
    for row in result.records:
        size = row["size_px"]
        pixels = slide.crop(size * row["x"], size * row["y"], size, size).numpy()
        assert row["phash"] == phash(pixels), row["image_name"]
        written = phash_file(layout.root / row["path"])
        assert hamming(row["phash"], written) <= NEAR_DUPLICATE_BITS, row["image_name"]
    assert [row["phash"] for row in result.rejected] == [None] * len(result.rejected)
    part = layout.manifest_dir(KEY) / "parts" / "tiles" / f"{STEM}.parquet"
    stored = pl.read_parquet(part).filter(pl.col("path").is_not_null())
    assert stored["phash"].dtype == pl.Int64
    assert sorted(stored["phash"]) == sorted(row["phash"] for row in result.records)


def test_tile_pixels_equal_the_standardized_slide_at_their_position(standardized):
    layout, slides = standardized
    result = _tile(layout, slides)
    std = layout.standardized_dir(KEY) / f"{STEM}.tiff"
    picks = {"XL": 1, "L": 3, "M": 3, "S": 3}
    with openslide.OpenSlide(std) as slide:
        for scale, count in picks.items():
            rows = [row for row in result.records if row["scale"] == scale][-count:]
            for row in rows:
                size = row["size_px"]
                tile = np.asarray(Image.open(layout.root / row["path"]))
                assert tile.shape == (size, size, 3)
                left, top = size * row["x"], size * row["y"]
                here = _mean_abs_difference(slide, (left, top), tile)
                shifted = _mean_abs_difference(slide, (left + 2, top + 1), tile)
                assert here < 0.7 * shifted  # JPEG q75 noise is smaller than a 2-px offset
                blocks = _block_means(tile) - _block_means(_region(slide, (left, top), size))
                assert np.abs(blocks).mean() < 1.5
                assert tile[..., 0].mean() == pytest.approx(row["mean_r"], abs=2.0)


def _region(slide: openslide.OpenSlide, where: tuple[int, int], size: int) -> np.ndarray:
    return np.asarray(slide.read_region(where, 0, (size, size)).convert("RGB"))


def _mean_abs_difference(slide, where: tuple[int, int], tile: np.ndarray) -> float:
    return float(np.abs(tile.astype(int) - _region(slide, where, len(tile))).mean())


def _block_means(pixels: np.ndarray) -> np.ndarray:
    """8x8-pixel means: JPEG keeps them, any misplacement changes them."""
    return np.asarray(Image.fromarray(pixels).reduce(8), dtype=float)


def test_real_svs_is_smaller_than_one_xl_tile(standardized):
    layout, slides = standardized
    cmu = [row for row in slides if "CMU" in row["source_file"]]
    result = _tile(layout, cmu)
    assert (result.records, result.rejected, result.failures) == ([], [], [])


def test_rerun_reuses_and_an_interrupted_slide_is_redone_cleanly(standardized, monkeypatch):
    layout, slides = standardized
    first = _tile(layout, slides)
    again = _tile(layout, slides)
    assert again.reused == 2 and again.records == first.records
    # Kill the slide halfway: some tiles staged, nothing recorded.
    saved = []
    original_save = tiling._TileWriter.save

    def crash_after_fifty(self, *args):
        if len(saved) == 50:
            raise KeyboardInterrupt
        saved.append(args)
        return original_save(self, *args)

    (layout.manifest_dir(KEY) / "parts" / "tiles" / f"{STEM}.json").unlink()
    monkeypatch.setattr(tiling._TileWriter, "save", crash_after_fifty)
    with pytest.raises(KeyboardInterrupt):
        _tile(layout, slides)
    monkeypatch.undo()
    assert any(p.name.endswith(".tiles.tmp") for p in layout.cpia_dir.rglob("*"))
    resumed = _tile(layout, slides)
    assert resumed.reused == 1 and resumed.records == first.records
    assert _files(layout) == sorted(row["path"] for row in first.records)
    assert not any(p.name.startswith(".") for p in layout.cpia_dir.rglob("*"))


def test_changed_settings_replace_the_previous_tiles(standardized):
    layout, slides = standardized
    _tile(layout, slides)
    result = _tile(layout, slides, s_fraction=0.2, jpeg_quality=60)
    assert result.reused == 0
    assert sum(row["scale"] == "S" for row in result.records) == 320
    assert _files(layout) == sorted(row["path"] for row in result.records)


def _mtimes(layout: DataLayout) -> dict[str, int]:
    """Every file this stage wrote (tiles, part files, markers) and when."""
    folders = [layout.cpia_dir, layout.manifest_dir(KEY) / "parts" / "tiles"]
    return {str(p): p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if p.is_file()}


def _copy_slide(layout: DataLayout, slides: list[dict], stem: str) -> dict:
    """A second tissue slide: the standardized file of the first one under another stem."""
    (slide,) = [slide for slide in slides if STEM in slide["source_file"]]
    source = layout.root / slide["standardized_file"]
    copy = source.with_name(f"{stem}.tiff")
    copy.write_bytes(source.read_bytes())
    return slide | {
        "source_file": f"raw/{KEY}/{stem}.tiff",
        "standardized_file": layout.relative(copy),
    }


def test_lineage_columns_from_the_shell_do_not_invalidate_finished_slides(standardized):
    layout, slides = standardized
    first = _tile(layout, slides)
    written = _mtimes(layout)
    rerun = [slide | {"run_id": "another-run", "code_version": "v2"} for slide in slides]
    again = _tile(layout, rerun)
    assert again.reused == len(slides) and again.records == first.records
    assert _mtimes(layout) == written


def test_slides_gone_from_the_partition_lose_their_tiles_and_parts(standardized):
    layout, slides = standardized
    second = _copy_slide(layout, slides, "TS-0002")
    _tile(layout, [*slides, second])
    assert any("TS-0002-" in path for path in _files(layout))
    one = _tile(layout, slides)
    assert one.reused == 2 and not one.failures
    assert _files(layout) == sorted(row["path"] for row in one.records)
    assert not any("TS-0002" in path for path in _files(layout))
    parts = layout.manifest_dir(KEY) / "parts" / "tiles"
    assert sorted(p.name for p in parts.iterdir()) == [
        f"{stem}.{ext}" for stem in ("CMU-1-Small-Region", STEM) for ext in ("json", "parquet")
    ]
    assert (layout.root / second["standardized_file"]).is_file()  # inputs are never touched


def test_an_unexpected_error_fails_only_its_slide(standardized, monkeypatch):
    layout, slides = standardized
    second = _copy_slide(layout, slides, "TS-0002")
    original_save = tiling._TileWriter.save

    def fail_second_slide_midway(self, scale, name, *args):
        if name.startswith("TS-0002-") and scale == "M":
            raise RuntimeError("disk on fire")
        return original_save(self, scale, name, *args)

    monkeypatch.setattr(tiling._TileWriter, "save", fail_second_slide_midway)
    result = _tile(layout, [*slides, second])
    (row,) = result.failures
    assert row["file"] == second["standardized_file"] and row["stage"] == tiling.STAGE
    assert row["reason"].startswith(second["standardized_file"])
    assert "RuntimeError: disk on fire" in row["reason"]
    assert {r["source_file"] for r in result.records} == {f"raw/{KEY}/{STEM}.tiff"}
    assert len(result.records) == 1 + 16 + 100 + 160
    assert _files(layout) == sorted(row["path"] for row in result.records)
    assert not any(p.name.startswith(".") for p in layout.cpia_dir.rglob("*"))


def test_per_m_tile_s_rule_cuts_one_s_cell_per_kept_m_tile(standardized):
    layout, slides = standardized
    result = _tile(layout, slides, s_rule="per_m_tile")
    kept: dict[str, list[dict]] = {}
    for row in result.records:
        kept.setdefault(row["scale"], []).append(row)
    assert len(kept["S"]) == len(kept["M"]) == 100  # WSIs-S / WSIs-M = 1 on full tissue
    m_positions = {(row["x"], row["y"]) for row in kept["M"]}
    row_in_m, column_in_m = tiling.PER_M_TILE_S_CELL
    for s_tile in kept["S"]:
        m_x, column = divmod(s_tile["x"], 4)
        m_y, row = divmod(s_tile["y"], 4)
        assert (row, column) == (row_in_m, column_in_m)
        assert (m_x, m_y) in m_positions
        assert s_tile["parent_image"] == tile_name(STEM, 384, m_x, m_y)
    assert tiling.rejection_counts(result.rejected) == {
        "xl_thumbnail": 1,  # the glass half is never read at full resolution
        "xl_tissue": 0,
        "sub_tiles": 0,
    }


def test_unknown_s_rule_is_refused():
    with pytest.raises(ValueError, match="s_rule must be one of"):
        TilingSettings(s_rule="per_xl")


def test_default_thresholds_separate_tissue_from_glass_on_a_real_frozen_section(tmp_path: Path):
    """TCGA-CR-7395-01A-01-TS1: a pale frozen-section H&E slide (the stain most likely to sit
    near the saturation threshold). The default tissue test must agree with an independent
    brightness criterion and keep the section's tiles while rejecting its glass."""
    with openslide.OpenSlide(TESTDATA / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    thresholds = TissueThresholds()
    saturation = saturation_map(pixels)
    grey = pixels.mean(axis=2)
    tissue_saturation = saturation[grey < 200]  # clearly stained pixels
    glass_saturation = saturation[grey > 235]
    # Wide margins on both sides of the default threshold (0.08).
    assert np.percentile(tissue_saturation, 5) > 2.5 * thresholds.saturation
    assert np.percentile(glass_saturation, 90) < 0.5 * thresholds.saturation
    # Per 48-px cell (about an M tile's tenth), the two criteria agree almost everywhere.
    by_saturation = grid_metrics(pixels, 74, 92, thresholds)["tissue_fraction"] >= 0.10
    brightness = (grey < 225)[: 74 * 48, : 92 * 48].reshape(74, 48, 92, 48).mean(axis=(1, 3))
    assert (by_saturation == (brightness >= 0.10)).mean() > 0.97
    assert 0.55 < by_saturation.mean() < 0.8

    # Tiled with the default thresholds (XL reduced to 1920 px: the slide is 4443 x 3567).
    layout = DataLayout(tmp_path / "data")
    standardized = build_slide(
        layout.standardized_dir(KEY) / "TCGA-CR-7395.tiff",
        pyvips.Image.new_from_array(pixels).copy(interpretation="srgb"),
        mpp=0.491,
    )
    slide_record = {
        "source_file": "raw/frozen/TCGA-CR-7395-01A-01-TS1.svs",
        "source_sha256": "x",
        "standardized_file": layout.relative(standardized),
    }
    result = tile_partition([slide_record], key=KEY, layout=layout,
                            settings=TilingSettings(xl_size=1920))  # fmt: skip
    assert not result.failures
    xl_kept = [row for row in result.records if row["scale"] == "XL"]
    assert len(xl_kept) == 2  # both halves of the section
    m_rows = [row for row in result.records + result.rejected if row["scale"] == "M"]
    m_kept = sum(row["path"] is not None for row in m_rows)
    assert 0.55 < m_kept / len(m_rows) < 0.9  # the section's holes and margins are dropped
