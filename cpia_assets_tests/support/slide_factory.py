"""Synthetic pyramidal slides built from the pixels of a real SVS (tests and benchmarks).

The real slides in shared/testdata are too small for XL tiles, so larger slides are made by
mirror-tiling CMU-1-Small-Region (flipped copies meet without seams) and writing the result as a
pyramidal tiled JPEG TIFF whose resolution tags carry the MPP (`synthetic.write_slide`), which
OpenSlide reads as a generic TIFF slide.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import openslide
import pyvips

from cpia_assets.core.synthetic import mirror_tile, write_slide
from cpia_assets.core.wsi.tissue import TissueThresholds, grid_metrics
from cpia_assets_tests.support.paths import TESTDATA

REAL_SVS = TESTDATA / "CMU-1-Small-Region.svs"


@cache
def real_pixels(name: str = REAL_SVS.name) -> np.ndarray:
    """Level-0 RGB pixels of a real test slide."""
    with openslide.OpenSlide(TESTDATA / name) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def mirrored(width: int, height: int, pixels: np.ndarray | None = None) -> pyvips.Image:
    """A width x height image tiled from `pixels` (default: the real SVS) and its mirrors."""
    base = pyvips.Image.new_from_array(real_pixels() if pixels is None else pixels)
    return mirror_tile(base, width, height)


def tissue_only(width: int, height: int) -> pyvips.Image:
    """Tissue everywhere: the densest crop of the real SVS, mirror-tiled."""
    return mirrored(width, height, real_pixels()[1800:2700, 900:1600])


def build_slide(path: Path, image: pyvips.Image, *, mpp: float, quality: int = 90) -> Path:
    """Write `image` as a pyramidal TIFF slide with `mpp` um/px in its resolution tags
    (`synthetic.write_slide`, BigTIFF when large, which OpenSlide also reads)."""
    return write_slide(path, image, mpp, quality=quality)


def build_40x_slide(path: Path, size: int, *, mpp: float = 0.25) -> Path:
    """A size x size mirror-tiled slide from the real SVS, declared at `mpp` (40x by default)."""
    return build_slide(path, mirrored(size, size), mpp=mpp)


@cache
def tissue_tiles(size: int = 384, min_tissue: float = 0.5) -> tuple[np.ndarray, ...]:
    """Distinct real tissue: the non-overlapping size x size tiles of the two real SVS test
    slides with at least `min_tissue` tissue (78 tiles of 384 px)."""
    tiles = []
    for name in (REAL_SVS.name, "TCGA-CR-7395-01A-01-TS1.svs"):
        pixels = real_pixels(name)
        for y in range(0, pixels.shape[0] - size + 1, size):
            for x in range(0, pixels.shape[1] - size + 1, size):
                tile = pixels[y : y + size, x : x + size]
                if (
                    grid_metrics(tile, 1, 1, TissueThresholds())["tissue_fraction"][0, 0]
                    >= min_tissue
                ):
                    tiles.append(tile)
    return tuple(tiles)
