"""How slides are standardized (`StandardizeSettings`), shared by the resampling, the TIFF
writer and the per-slide jobs, and the error of a standardization that is not the slide's fault."""

from __future__ import annotations

from dataclasses import dataclass


class StandardizeError(Exception):
    """Standardization of one slide failed for a reason that is not the slide's fault."""


@dataclass(frozen=True)
class StandardizeSettings:
    """How slides are standardized. `tolerance` is relative (0.02 = within 2% of the target
    MPP on both axes is left unresampled); 0 resamples every slide exactly.

    `jpeg_quality` of the TIFF's tiles, 89 by default: below 90 libvips writes them as YCbCr
    with 4:2:0 chroma, as slide scanners store their JPEG tiles; at 90 and above as RGB (4:4:4
    chroma). The TIFF is an intermediate: in the one-pass run the tiles are cut from the
    resampled pixels, and the TIFF serves re-tiling (`scale_tiles` alone) and viewing. On
    tissue, 89 gives files 2.7x smaller than 90, encodes 1.8x faster and errs 1.5x more (mean
    absolute difference from the resampled pixels 3.0 instead of 2.0 on the real CMU-1 slide);
    90 or more is for users who re-tile from the TIFF often. See
    `benchmarks/bench_tiling.py --tiff-quality` and the README."""

    target_mpp: float = 0.491
    tolerance: float = 0.0
    jpeg_quality: int = 89
    tiff_tile_px: int = 256

    def __post_init__(self) -> None:
        if self.target_mpp <= 0:
            raise ValueError(f"target_mpp must be positive, got {self.target_mpp}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1-100, got {self.jpeg_quality}")
        if self.tiff_tile_px % 16:
            raise ValueError(f"tiff_tile_px must be a multiple of 16, got {self.tiff_tile_px}")
