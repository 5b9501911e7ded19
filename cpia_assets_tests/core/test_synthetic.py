"""The demo's synthetic sources are built from the real H&E crop shipped with the package."""

from __future__ import annotations

import numpy as np
import openslide

from cpia_assets.core.synthetic import (
    BACKGROUND,
    GLASS_PATCH,
    HE_SAMPLE_MPP,
    glass,
    he_sample,
    he_texture,
    mirror_tile,
)
from cpia_assets.core.wsi.tissue import TissueThresholds, grid_metrics
from cpia_assets_tests.support.paths import REPO, TESTDATA


def test_shipped_crop_is_cmu1_pixels_and_small():
    crop = (REPO / "cpia_assets" / "data" / "cmu1_he_crop.jpg").stat()
    assert crop.st_size < 400_000
    with openslide.OpenSlide(TESTDATA / "CMU-1-Small-Region.svs") as slide:
        assert float(slide.properties["openslide.mpp-x"]) == HE_SAMPLE_MPP
        region = np.asarray(slide.read_region((760, 1840), 0, (1024, 1024)).convert("RGB"))
    shipped = he_sample().numpy()
    assert shipped.shape == region.shape
    # The same picture up to JPEG re-encoding: 8x8 block means agree closely.
    assert np.abs(_block_means(shipped) - _block_means(region)).mean() < 2


def test_mirror_tile_continues_with_flipped_copies():
    sample = he_sample()
    tiled = mirror_tile(sample, 2 * sample.width, 2 * sample.height).numpy()
    original = sample.numpy()
    assert np.array_equal(tiled[: sample.height, : sample.width], original)
    assert np.array_equal(tiled[: sample.height, sample.width :], original[:, ::-1])
    assert np.array_equal(tiled[sample.height :, : sample.width], original[::-1])
    shifted = mirror_tile(sample, 100, 80, left=2 * sample.width + 5, top=7).numpy()
    assert np.array_equal(shifted, original[7:87, 5:105])  # offsets wrap around the 2x2 block


def test_texture_holds_real_tissue_and_blank_glass_at_the_requested_resolution():
    thresholds = TissueThresholds()
    at_20x = he_texture(2048, 2048, seed=4, tissue_fraction=0.5)
    at_40x = he_texture(2048, 2048, seed=4, tissue_fraction=0.5, mpp=0.25)
    cells = grid_metrics(at_20x.numpy(), 16, 16, thresholds)["tissue_fraction"]
    assert (cells > 0.8).sum() >= 40 and (cells < 0.01).sum() >= 40  # tissue islands and glass
    # Same tissue drawn twice as large at 0.25 um/px: fewer details per pixel, so smoother.
    assert _grey_gradient(at_40x.numpy()) < 0.75 * _grey_gradient(at_20x.numpy())
    pixels = he_sample().numpy().reshape(-1, 3).mean(axis=0)
    red, green, blue = pixels
    assert red > green + 20 and blue > green  # pink/purple H&E, not grey


def test_glass_is_noisy_near_white_and_differs_per_seed():
    """A slide-sized glass field is cut from one noise patch: the noise keeps its level and each
    seed cuts elsewhere, but it repeats only beyond the patch."""
    field = glass(3000, 2000, seed=5).numpy().astype(np.int16)
    assert field.shape == (2000, 3000, 3)
    assert np.abs(field.reshape(-1, 3).mean(axis=0) - BACKGROUND).max() < 1  # cast truncates
    assert 1.5 < field.std(axis=(0, 1)).mean() < 2.5  # sigma 2, rounded to integers
    assert np.array_equal(field, glass(3000, 2000, seed=5).numpy())  # deterministic
    other = glass(3000, 2000, seed=6).numpy()
    assert (other != field).mean() > 0.5
    block = field[:GLASS_PATCH, :GLASS_PATCH]
    assert (field[:GLASS_PATCH, 1 : GLASS_PATCH + 1] != block).mean() > 0.5  # no short period


def _grey_gradient(rgb: np.ndarray) -> float:
    grey = rgb.astype(np.float32).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=1)).mean())


def _block_means(rgb: np.ndarray, block: int = 8) -> np.ndarray:
    height, width = rgb.shape[0] // block, rgb.shape[1] // block
    cropped = rgb[: height * block, : width * block].astype(np.float32)
    return cropped.reshape(height, block, width, block, 3).mean(axis=(1, 3))
