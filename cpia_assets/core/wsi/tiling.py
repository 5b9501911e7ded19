"""scale_tiles: the multi-scale CPIA tiles (XL 3840, L 960, M 384, S 96) of standardized slides.

Geometry: XL tiles form a non-overlapping grid over the standardized slide (partial tiles at the
right and bottom edges are not cut). A kept XL tile yields L = its 4x4 grid, M = its 10x10
grid and S cells of its 40x40 grid chosen by `s_rule`. An S cell is a candidate only under a
kept M tile (S is cut from M). Blank sub-tiles are dropped (`tissue` module docstring).

The paper states the S rule two ways. Its text: a uniform 10% of the 40x40 cells, so
XL:L:M:S is 1:16:100:160 on tissue (`s_rule="uniform"`, the default; `s_fraction` of the cells,
drawn with a seed derived from the XL tile's name, so reruns pick the same cells). Its Table I
(WSIs-S / WSIs-M = 0.95) and the published script: one S crop per kept M tile, the cell at row 2,
column 1 of the M tile's 4x4 grid of S cells (`s_rule="per_m_tile"`, reproduces the released
data; `cpia_repo_notes.md`).

An XL candidate that the thumbnail test rejects is never read at full resolution: its record
holds the thumbnail's metrics with `blur` null (`rejection_counts` counts them).

Names: `<slide stem>-<size>-<x>-<y>` with the top-left corner at (size * x, size * y) in the
standardized slide, e.g. `TCGA-A2-A0EY-01A-01-BSA-960-39-6`. Tiles keep their native size.

Each XL region is decoded once; every smaller scale is cut from it in memory. Large tiles are
JPEG-encoded by libvips and M and S tiles by Pillow (about 2x faster for these sizes, whose
per-call overhead dominates in libvips; same libjpeg-turbo, quality and 4:2:0 chroma
subsampling). Two sources of pixels, recorded per row in `cut_from`:
the stored standardized TIFF (`tile_slide`, `standardized_tiff`) or, when standardized_wsi runs
in the same pass, the resampled pixels on their way into that TIFF (`StripTiler`, `resampled`,
see `core/wsi/fused.py`); both take the same decisions and write the same records. Each saved
tile's perceptual hash (TILES `phash`) is taken from the pixels in memory that it encodes.

A partition's slides are tiled as atomic, resumable jobs in `tile_jobs.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyvips
from PIL import Image

from cpia_assets.core.fsutil import OutputWriteError, writing
from cpia_assets.core.perceptual import phash
from cpia_assets.core.wsi.pyramid import trim_operation_cache
from cpia_assets.core.wsi.tissue import (
    METRICS,
    TissueThresholds,
    cell_sums,
    coarsen,
    grid_metrics,
    metrics_from_sums,
)

STAGE = "scale_tiles"
SCALES = ("XL", "L", "M", "S")
CELLS_PER_XL_EDGE = {"XL": 1, "L": 4, "M": 10, "S": 40}
PIL_ENCODE_MAX_PX = 384
"""Tiles up to this edge (M and S) are encoded by Pillow (module docstring)."""
S_RULES = ("uniform", "per_m_tile")
PER_M_TILE_S_CELL = (2, 1)
"""(row, column) of the one S cell an M tile gives under `s_rule="per_m_tile"`."""


CUT_FROM_TIFF = "standardized_tiff"
"""TILES `cut_from`: decoded from the stored standardized TIFF (q89 by default), then encoded
again."""
CUT_FROM_RESAMPLED = "resampled"
"""TILES `cut_from`: the resampled pixels in memory before the TIFF encoding (fused path,
one JPEG generation)."""


@dataclass(frozen=True)
class TilingSettings:
    xl_size: int = 3840
    jpeg_quality: int = 75
    s_fraction: float = 0.1
    """Share of the 40x40 S cells kept per XL tile under `s_rule="uniform"`."""
    s_rule: str = "uniform"
    """`uniform` (the paper's text) or `per_m_tile` (its Table I and scripts); module docstring."""
    thresholds: TissueThresholds = field(default_factory=TissueThresholds)
    metric_downsample: int = 4
    """Metrics are measured on the XL region box-shrunk by this factor (S cells stay whole)."""
    thumbnail_downsample: int = 32
    """The slide-level mask is read from the standardized pyramid level nearest this factor."""

    def __post_init__(self) -> None:
        if self.xl_size % (CELLS_PER_XL_EDGE["S"] * self.metric_downsample):
            raise ValueError(
                f"xl_size {self.xl_size} must be a multiple of 40 x metric_downsample "
                f"({self.metric_downsample}) so that every S cell is whole"
            )
        if not 0 < self.s_fraction <= 1:
            raise ValueError(f"s_fraction must be in (0, 1], got {self.s_fraction}")
        if self.s_rule not in S_RULES:
            raise ValueError(f"s_rule must be one of {S_RULES}, got {self.s_rule!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1-100, got {self.jpeg_quality}")

    def size(self, scale: str) -> int:
        return self.xl_size // CELLS_PER_XL_EDGE[scale]


def with_thresholds(settings: TilingSettings, overrides: Mapping[str, float]) -> TilingSettings:
    """`settings` with some tissue thresholds replaced: a catalog entry's `tissue_thresholds`,
    e.g. a lower saturation for a pale stain (validated again by `TissueThresholds`)."""
    if not overrides:
        return settings
    return replace(settings, thresholds=replace(settings.thresholds, **overrides))


def tile_name(stem: str, size: int, x: int, y: int) -> str:
    """`<slide stem>-<size>-<x>-<y>`: the tile's top-left is (size * x, size * y)."""
    return f"{stem}-{size}-{x}-{y}"


def xl_ratio_text(counts: Mapping[str, int]) -> str:
    """`1:L:M:S` per XL tile, e.g. `1:16.0:100.0:160.0` (the spec's full-CPIA ratio)."""
    xl = counts.get("XL", 0)
    if not xl:
        return "no XL tiles"
    return "1:" + ":".join(f"{counts.get(scale, 0) / xl:.1f}" for scale in SCALES[1:])


def sample_cells(name: str, *, grid: int, fraction: float) -> list[int]:
    """A uniform sample of round(fraction * grid^2) cells (row-major indices, sorted), seeded
    from `name` so the same tile always gets the same cells."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    count = round(grid * grid * fraction)
    chosen = np.random.default_rng(seed).choice(grid * grid, size=count, replace=False)
    return sorted(int(cell) for cell in chosen)


@dataclass(frozen=True)
class Candidate:
    """One candidate tile and its decision; `file` is where it was written (None: rejected)
    and `phash` the perceptual hash of the pixels encoded into it."""

    scale: str
    name: str
    size: int
    x: int
    y: int
    parent: str | None
    metrics: Mapping[str, float | None]
    file: Path | None
    phash: int | None = None


def tile_slide(
    standardized: Path, *, stem: str, out_dirs: Mapping[str, Path], settings: TilingSettings
) -> list[Candidate]:
    """Cut one standardized slide into kept tiles written under `out_dirs[scale]`; returns
    every candidate (kept or rejected) with its metrics."""
    slide = pyvips.Image.tiffload(str(standardized))
    xl = settings.xl_size
    columns, rows = slide.width // xl, slide.height // xl
    if not columns or not rows:
        return []
    thumbnail = _thumbnail(standardized, slide, settings.thumbnail_downsample)
    fx, fy = thumbnail.shape[1] / slide.width, thumbnail.shape[0] / slide.height
    for folder in set(out_dirs.values()):
        folder.mkdir(parents=True, exist_ok=True)
    candidates: list[Candidate] = []
    for row in range(rows):
        for column in range(columns):
            footprint = thumbnail[
                int(row * xl * fy) : max(int(row * xl * fy) + 1, int((row + 1) * xl * fy)),
                int(column * xl * fx) : max(int(column * xl * fx) + 1, int((column + 1) * xl * fx)),
            ]
            region = partial(_decoded, slide.crop(column * xl, row * xl, xl, xl))
            candidates.extend(
                _xl_candidates(footprint, region, (column, row), stem, out_dirs, settings)
            )
    return candidates


def _decoded(region: pyvips.Image) -> tuple[pyvips.Image, np.ndarray]:
    """`region` decoded once: as a libvips image in memory and as its pixels."""
    region = region.copy_memory()
    return region, region.numpy()


class StripTiler:
    """Cuts a slide's tiles from its standardized pixels while they are written into the
    TIFF (`standardize.StripConsumer`, the fused path): one strip per row of XL tiles.

    The thumbnail test sees the strip box-shrunk by the factor of the pyramid page that
    `tile_slide` would read from the finished TIFF, so both paths take the same decisions
    (their metrics differ only by the TIFF's JPEG encoding). An unexpected error while cutting
    stops the cut, not the TIFF: it is kept in `error`, and the slide is tiled from its
    finished TIFF instead (`fused.py`). An output-side fault (disk full) is raised."""

    def __init__(self, *, stem: str, out_dirs: Mapping[str, Path], settings: TilingSettings):
        self.rows = settings.xl_size
        self.stem, self.out_dirs, self.settings = stem, out_dirs, settings
        self.candidates: list[Candidate] = []
        self.size: tuple[int, int] | None = None
        self.rows_seen = 0
        self.error: str | None = None

    @property
    def complete(self) -> bool:
        """Whether every row of the slide was cut here (else tile it from the stored TIFF)."""
        return self.error is None and self.size is not None and self.rows_seen == self.size[1]

    def begin(self, size: tuple[int, int]) -> None:
        self.size = size
        for folder in set(self.out_dirs.values()):
            folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, strip: np.ndarray) -> None:
        assert self.size is not None, "begin() first"
        row, self.rows_seen = self.rows_seen // self.rows, self.rows_seen + len(strip)
        if len(strip) < self.settings.xl_size or self.error is not None:
            return  # the partial bottom row of XL tiles is not cut; nor is any after an error
        try:
            self._cut(strip, row)
        except OutputWriteError:
            raise
        except Exception as exc:  # see the class docstring
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            trim_operation_cache()  # its crops of the strip would keep the strip's memory

    def _cut(self, strip: np.ndarray, row: int) -> None:
        assert self.size is not None
        xl = self.settings.xl_size
        factor = _page_factor(self.size, self.settings.thumbnail_downsample)
        image = pyvips.Image.new_from_array(strip)  # shares the strip's memory
        for column in range(strip.shape[1] // xl):
            crop = image.crop(column * xl, 0, xl, xl)
            footprint = crop.shrink(factor, factor).numpy() if factor > 1 else crop.numpy()
            region = partial(_pair, crop, strip[:, column * xl : (column + 1) * xl])
            self.candidates.extend(
                _xl_candidates(
                    footprint, region, (column, row), self.stem, self.out_dirs, self.settings
                )
            )


def _pair(region: pyvips.Image, pixels: np.ndarray) -> tuple[pyvips.Image, np.ndarray]:
    return region, pixels


def _page_factor(size: tuple[int, int], downsample: int, tile_px: int = 256) -> int:
    """The downsample of the pyramid page `_thumbnail` reads: libvips halves a page while it
    is wider or taller than one TIFF tile (`tile_px`, as `standardize` writes it)."""
    width, height, factor = *size, 1
    while (width > tile_px or height > tile_px) and factor * 2 <= downsample * 1.01:
        width, height, factor = width // 2, height // 2, factor * 2
    return factor


def _xl_candidates(
    footprint: np.ndarray,
    region: Callable[[], tuple[pyvips.Image, np.ndarray]],
    position: tuple[int, int],
    stem: str,
    out_dirs: Mapping[str, Path],
    settings: TilingSettings,
) -> Iterator[Candidate]:
    """The XL candidate at `position`: rejected on its thumbnail `footprint` without reading
    its pixels, else the XL tile and its sub-tiles (`_cut_region`) from `region()` (the tile
    as a libvips image and as an array of the same pixels)."""
    thresholds = settings.thresholds
    column, row = position
    xl = settings.xl_size
    coarse = _cell(grid_metrics(footprint, 1, 1, thresholds), 0, 0)
    if coarse["tissue_fraction"] < thresholds.thumbnail_min_tissue:
        coarse["blur"] = None  # meaningless at thumbnail resolution
        name = tile_name(stem, xl, column, row)
        yield Candidate("XL", name, xl, column, row, None, coarse, None)
        return
    yield from _cut_region(*region(), position, stem, out_dirs, settings)


def _cut_region(
    region: pyvips.Image,
    pixels: np.ndarray,
    position: tuple[int, int],
    stem: str,
    out_dirs: Mapping[str, Path],
    settings: TilingSettings,
) -> Iterator[Candidate]:
    """The XL tile at `position` and, when it is kept, its L, M and S candidates."""
    thresholds = settings.thresholds
    small = region.shrink(settings.metric_downsample, settings.metric_downsample).numpy()
    column, row = position
    xl = settings.xl_size
    xl_name = tile_name(stem, xl, column, row)
    finest = CELLS_PER_XL_EDGE["S"]
    sums = cell_sums(small, finest, finest, thresholds)
    xl_metrics = _cell(metrics_from_sums(coarsen(sums, finest)), 0, 0)
    if xl_metrics["tissue_fraction"] < thresholds.xl_min_tissue:
        yield Candidate("XL", xl_name, xl, column, row, None, xl_metrics, None)
        return
    writer = _TileWriter(region, pixels, out_dirs, settings.jpeg_quality)
    yield Candidate(
        "XL", xl_name, xl, column, row, None, xl_metrics, *writer.save("XL", xl_name, 0, 0, xl)
    )
    kept_m: set[tuple[int, int]] = set()
    for scale in ("L", "M", "S"):
        cells = CELLS_PER_XL_EDGE[scale]
        size = settings.size(scale)
        metrics = metrics_from_sums(coarsen(sums, finest // cells))
        chosen = _s_cells(xl_name, kept_m, settings) if scale == "S" else range(cells * cells)
        for index in chosen:
            j, i = divmod(index, cells)
            name = tile_name(stem, size, column * cells + i, row * cells + j)
            values = _cell(metrics, j, i)
            parent = xl_name
            keep = values["tissue_fraction"] >= thresholds.tile_min_tissue
            if scale == "S":
                m_cell = (i * size // settings.size("M"), j * size // settings.size("M"))
                m_position = _global(m_cell, position, CELLS_PER_XL_EDGE["M"])
                parent = tile_name(stem, settings.size("M"), *m_position)
                keep = keep and m_cell in kept_m
            elif scale == "M" and keep:
                kept_m.add((i, j))
            saved = writer.save(scale, name, i * size, j * size, size) if keep else (None, None)
            yield Candidate(
                scale, name, size, column * cells + i, row * cells + j, parent, values, *saved
            )


def _s_cells(xl_name: str, kept_m: set[tuple[int, int]], settings: TilingSettings) -> list[int]:
    """Row-major indices of the XL tile's S cells to cut, per `settings.s_rule`."""
    grid = CELLS_PER_XL_EDGE["S"]
    if settings.s_rule == "uniform":
        return sample_cells(xl_name, grid=grid, fraction=settings.s_fraction)
    per_m = grid // CELLS_PER_XL_EDGE["M"]
    row, column = PER_M_TILE_S_CELL
    return sorted((j * per_m + row) * grid + i * per_m + column for i, j in kept_m)


def rejection_counts(rejected: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Rejected candidates (TILES rows) by the test that rejected them: `xl_thumbnail` (the
    slide-level thumbnail test, `blur` null), `xl_tissue` (the XL tissue test) and `sub_tiles`
    (blank L, M and S tiles)."""
    counts = dict.fromkeys(("xl_thumbnail", "xl_tissue", "sub_tiles"), 0)
    for row in rejected:
        if row["scale"] != "XL":
            counts["sub_tiles"] += 1
        else:
            counts["xl_thumbnail" if row["blur"] is None else "xl_tissue"] += 1
    return counts


def _global(cell: tuple[int, int], xl_position: tuple[int, int], cells: int) -> tuple[int, int]:
    return xl_position[0] * cells + cell[0], xl_position[1] * cells + cell[1]


class _TileWriter:
    """JPEG-encodes crops of one decoded XL region into the scale folders, and hashes them."""

    def __init__(
        self,
        region: pyvips.Image,
        pixels: np.ndarray,
        out_dirs: Mapping[str, Path],
        quality: int,
    ) -> None:
        self.region, self.pixels, self.out_dirs, self.quality = region, pixels, out_dirs, quality

    def save(self, scale: str, name: str, left: int, top: int, size: int) -> tuple[Path, int]:
        """The crop's file and the perceptual hash of its pixels (before JPEG encoding)."""
        path = self.out_dirs[scale] / f"{name}.jpg"
        pixels = self.pixels[top : top + size, left : left + size]
        if size > PIL_ENCODE_MAX_PX:
            with writing(path):
                self.region.crop(left, top, size, size).jpegsave(str(path), Q=self.quality)
            return path, phash(pixels)  # no Pillow copy of a large tile (`perceptual` docstring)
        crop = Image.fromarray(pixels)
        with writing(path):
            crop.save(path, "JPEG", quality=self.quality)
        return path, phash(crop)


def _cell(metrics: Mapping[str, np.ndarray], j: int, i: int) -> dict[str, float | None]:
    return {name: float(metrics[name][j, i]) for name in METRICS}


def _thumbnail(path: Path, slide: pyvips.Image, downsample: int) -> np.ndarray:
    """RGB pixels of the pyramid page closest to (not coarser than) `downsample`."""
    page = 0
    for candidate in range(slide.get("n-pages")):
        width = pyvips.Image.tiffload(str(path), page=candidate).width
        if slide.width / width <= downsample * 1.01:
            page = candidate
    return pyvips.Image.tiffload(str(path), page=page).numpy()
