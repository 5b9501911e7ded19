"""Per-tile metrics and the tissue test that decides which tiles are kept.

The tissue test (all thresholds in `TissueThresholds`):

1. A pixel is tissue when its HSV saturation, (max - min) / max of R, G, B, is at least
   `saturation` and its brightest channel is at least `min_brightness`. Glass and white
   background are grey (saturation about 0.01-0.04); H&E stroma and nuclei are pink and purple
   (0.2-0.7); scanner-black areas are excluded by the brightness floor.
2. Slide level: a thumbnail of the standardized slide gives a tissue mask; an XL cell is a
   candidate only when at least `thumbnail_min_tissue` of its footprint is tissue, so empty glass
   is never read at full resolution.
3. Tile level: a candidate XL tile is kept when its tissue fraction is at least `xl_min_tissue`;
   an L, M or S sub-tile of a kept XL tile is kept when its own fraction is at least
   `tile_min_tissue` (the "blank" test).

Metrics are measured on a box-downsampled copy of the tile (`metric_downsample` in the tiling
settings, about 2 um/px at the default 4x), which keeps them cheap; mean RGB is exact under box
averaging. Blur is the variance of the 4-neighbour Laplacian of the grey image (low = blurry).
Every metric is stored in the manifest, kept or not, so thresholds can be changed later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("mean_r", "mean_g", "mean_b", "tissue_fraction", "saturation", "blur")


@dataclass(frozen=True)
class TissueThresholds:
    saturation: float = 0.08
    min_brightness: int = 30
    thumbnail_min_tissue: float = 0.02
    xl_min_tissue: float = 0.25
    tile_min_tissue: float = 0.10

    def __post_init__(self) -> None:
        fractions = {
            "saturation": self.saturation,
            "thumbnail_min_tissue": self.thumbnail_min_tissue,
            "xl_min_tissue": self.xl_min_tissue,
            "tile_min_tissue": self.tile_min_tissue,
        }
        for name, value in fractions.items():
            if not 0 <= value <= 1:
                raise ValueError(f"tissue threshold {name} must be in [0, 1], got {value}")


def saturation_map(rgb: np.ndarray, brightest: np.ndarray | None = None) -> np.ndarray:
    """HSV saturation per pixel of an RGB uint8 image, as float32 in [0, 1] (0 for black);
    `brightest` is its `brightest_channel` when already known."""
    if brightest is None:
        brightest = brightest_channel(rgb)
    red, green, blue = (rgb[..., channel] for channel in range(3))
    spread = brightest - np.minimum(np.minimum(red, green), blue)
    return spread.astype(np.float32) / np.maximum(brightest, 1).astype(np.float32)


def brightest_channel(rgb: np.ndarray) -> np.ndarray:
    """max(R, G, B) per pixel; pairwise over the channel planes, several times faster than
    numpy's reduction over a last axis of length 3."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def grid_metrics(
    rgb: np.ndarray, rows: int, cols: int, thresholds: TissueThresholds
) -> dict[str, np.ndarray]:
    """Every metric of `METRICS` for each cell of a rows x cols grid over `rgb` (H, W, 3 uint8),
    as float32 arrays of shape (rows, cols). The image is cropped to a whole number of cells."""
    return metrics_from_sums(cell_sums(rgb, rows, cols, thresholds))


def cell_sums(rgb: np.ndarray, rows: int, cols: int, thresholds: TissueThresholds) -> np.ndarray:
    """Per-cell sums (rows, cols, 8): pixel count, R, G, B, tissue, saturation, Laplacian and
    its square. Sums of neighbouring cells add up, so one fine grid serves every coarser one
    (`coarsen`)."""
    cell_h, cell_w = rgb.shape[0] // rows, rgb.shape[1] // cols
    if cell_h == 0 or cell_w == 0:
        raise ValueError(f"a {rgb.shape[:2]} image cannot hold a {rows}x{cols} grid")
    rgb = rgb[: rows * cell_h, : cols * cell_w]
    brightest = brightest_channel(rgb)
    saturation = saturation_map(rgb, brightest)
    tissue = (saturation >= thresholds.saturation) & (brightest >= thresholds.min_brightness)
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    laplacian = _laplacian(grey)

    def cell_totals(plane: np.ndarray) -> np.ndarray:
        """(rows, cols, channels) sums of an (H, W[, channels]) plane; summing one axis at a
        time over contiguous rows is several times faster than one 2-axis reduction."""
        channels = plane.size // (plane.shape[0] * plane.shape[1])
        by_rows = plane.reshape(rows, cell_h, -1).sum(axis=1, dtype=np.float64)
        return by_rows.reshape(rows, cols, cell_w, channels).sum(axis=2)

    counts = np.full((rows, cols, 1), cell_h * cell_w, np.float64)
    planes = (rgb, tissue, saturation, laplacian, laplacian * laplacian)
    return np.concatenate([counts, *(cell_totals(plane) for plane in planes)], axis=2)


def coarsen(sums: np.ndarray, factor: int) -> np.ndarray:
    """Cell sums of a grid `factor` times coarser on each axis."""
    rows, cols, planes = sums.shape
    shaped = sums.reshape(rows // factor, factor, cols // factor, factor, planes)
    return shaped.sum(axis=(1, 3))


def metrics_from_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """The `METRICS` of each cell from its `cell_sums`."""
    means = sums[..., 1:] / sums[..., :1]
    laplacian_mean = means[..., 5]
    values = {
        "mean_r": means[..., 0],
        "mean_g": means[..., 1],
        "mean_b": means[..., 2],
        "tissue_fraction": means[..., 3],
        "saturation": means[..., 4],
        "blur": means[..., 6] - laplacian_mean * laplacian_mean,
    }
    return {name: value.astype(np.float32) for name, value in values.items()}


def _laplacian(grey: np.ndarray) -> np.ndarray:
    padded = np.pad(grey, 1, mode="edge")
    return padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4 * grey
