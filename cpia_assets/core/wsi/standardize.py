"""standardized_wsi: every slide resampled to one target MPP and written as a pyramidal TIFF.

Per slide: resolve the MPP (`slides.resolve_mpp`), pick the coarsest pyramid level that is not
coarser than the target, resample it and write a tiled JPEG TIFF pyramid whose resolution tags
make OpenSlide report the output MPP. Nothing is snapped: a 0.499 um/px slide is enlarged by
1.63% to reach 0.491, unless a `tolerance` is set, in which case slides within it are copied at
their own MPP (`resampled` is False in the record).

How (`resample.py`): shrinking on both axes runs in libvips as one lazy pipeline, decode ->
resample -> `tiffsave`; any enlarging axis is resampled by Pillow with Lanczos-3 in row bands
that reach libvips as an uncompressed PNG stream (`pyramid.py`). Levels that libvips cannot
decode (OpenSlide-only formats) also arrive as a PNG row stream. When the tiles are cut in the
same pass (`fused.py`), a `StripConsumer` sees the output pixels on their way into the TIFF:
shrunk levels are then computed by libvips one strip of output rows at a time and reach
`tiffsave` as a PNG row stream too.

Streaming: libvips pulls source tiles on demand and writes the pyramid strip by strip; Pillow
bands hold about `_BAND_BYTES` of source rows plus the filter margin. Memory therefore depends
on the slide width, never on its height or area.

A partition's slides run as resumable jobs in `slide_jobs.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyvips

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.fsutil import OutputWriteError, atomic_path, output_fault
from cpia_assets.core.wsi.pyramid import save_pyramid, write_pyramid_tiff
from cpia_assets.core.wsi.resample import ResamplePlan, plan_resample, resample_rows, shrink_image
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slides import SlideReader, SlideReadError, open_slide

STAGE = "standardized_wsi"
_BAND_BYTES = 16 << 20
"""Source pixels held per band (RGB bytes); bounds memory whatever the slide size."""


class StripConsumer(Protocol):
    """Receives the standardized pixels as they are written (the fused path, `fused.py`):
    `begin` with the output size, then consecutive bands of `rows` rows (the last one may be
    shorter), top to bottom."""

    rows: int

    def begin(self, size: tuple[int, int]) -> None: ...

    def __call__(self, strip: np.ndarray) -> None: ...


def standardize_slide(
    source: Path,
    dest: Path,
    *,
    options: WsiOptions,
    settings: StandardizeSettings,
    strips: StripConsumer | None = None,
) -> dict[str, Any]:
    """Standardize one slide into `dest` (atomically); returns its SLIDES fields except the
    source identity and paths. Raises `SlideError` for slides that cannot be used.

    `strips`, when given, also receives every output pixel as it is written, unless the level
    is one that libvips shrinks from an OpenSlide row stream (the pixels never reach Python
    there: `strips` is then not called at all)."""
    with open_slide(source, options) as reader:
        mpp = reader.resolve_mpp(options)
        plan = plan_resample(reader.info, mpp, settings)
        with atomic_path(dest) as tmp:
            _write_standardized(reader, plan, tmp, settings, strips)
        info = reader.info
    return {
        "vendor": info.vendor,
        "width": info.dimensions[0],
        "height": info.dimensions[1],
        "mpp_x": mpp.x,
        "mpp_y": mpp.y,
        "mpp_origin": mpp.origin,
        "level": plan.level,
        "level_downsample": info.level_downsamples[plan.level],
        "scale_factor": mpp.x / plan.output_mpp[0],  # output px per level-0 px
        "resampled": plan.resampled,
        "target_mpp": settings.target_mpp,
        "std_width": plan.output_size[0],
        "std_height": plan.output_size[1],
    }


def _write_standardized(
    reader: SlideReader,
    plan: ResamplePlan,
    dest: Path,
    settings: StandardizeSettings,
    strips: StripConsumer | None,
) -> None:
    """The plan's level resampled into `dest`: one libvips pipeline unless Lanczos enlargement
    (Pillow, banded) or an OpenSlide-only level (row stream) is needed (module docstring).
    With `strips`, the output pixels of the first two cases pass through Python on their way
    into the TIFF (`standardize_slide`)."""
    tile_rows = reader.info.tile_height(plan.level)
    chunk_rows = max(1, _BAND_BYTES // (3 * plan.level_size[0] * tile_rows)) * tile_rows
    rows = reader.iter_rows(plan.level, chunk_rows)
    if plan.enlarges:
        band_rows = max(16, math.floor(chunk_rows * plan.scale[1]))
        bands = resample_rows(rows, plan, band_rows=band_rows)
    else:
        level = reader.level_image(plan.level)
        if level is None:
            write_pyramid_tiff(
                dest,
                rows,
                size=plan.level_size,
                mpp=plan.output_mpp,
                settings=settings,
                transform=lambda image: shrink_image(image, plan),
            )
            return
        if strips is None:
            with _reading_level(reader, plan.level, dest):
                save_pyramid(
                    shrink_image(level, plan), dest, mpp=plan.output_mpp, settings=settings
                )
            return
        bands = _vips_strips(shrink_image(level, plan), strips.rows)
    if strips is not None:
        strips.begin(plan.output_size)
        bands = _passed_to(strips, _regrouped(bands, strips.rows))
    with _reading_level(reader, plan.level, dest):
        write_pyramid_tiff(
            dest, bands, size=plan.output_size, mpp=plan.output_mpp, settings=settings
        )


@contextlib.contextmanager
def _reading_level(reader: SlideReader, level: int, dest: Path) -> Iterator[None]:
    """A libvips error inside the block that is no output fault is the slide's: its level
    cannot be decoded. A failed write of `dest` is never the slide's (`OutputWriteError`; a
    temporary that vanished meanwhile becomes `OutputLostError` in `atomic_path`)."""
    try:
        yield
    except pyvips.Error as exc:
        if output_fault(exc, dest):
            raise  # disk full ...: no fault of the slide; `atomic_path` names the final path
        text = f"{exc}\n{getattr(exc, 'detail', '')}"
        if f"{dest}: write error" in text or "wbuffer_write: write failed" in text:
            first = text.strip().splitlines()[0]
            raise OutputWriteError(dest, f"libvips could not write it: {first}") from exc
        raise SlideReadError(reader.path, f"cannot read level {level}: {exc}") from exc


def _vips_strips(image: pyvips.Image, rows: int) -> Iterator[np.ndarray]:
    """`image` computed `rows` rows at a time (each strip only decodes the source it needs).

    Memory: the consumers below drop each strip before the next one is computed (`del`), so
    that only one strip and the transient copy of the next are held at once."""
    for top in range(0, image.height, rows):
        yield image.crop(0, top, image.width, min(rows, image.height - top)).numpy()


def _regrouped(bands: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """The rows of `bands` regrouped into bands of exactly `rows` rows (the last one shorter)."""
    pending: list[np.ndarray] = []
    count = 0
    for band in bands:
        pending.append(band)
        count += len(band)
        del band
        while count >= rows:
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
            yield joined[:rows]
            count -= rows
            pending = [joined[rows:]] if count else []  # an empty view would pin the strip
            del joined
    if count:
        yield np.concatenate(pending)


def _passed_to(strips: StripConsumer, bands: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for band in bands:
        strips(band)
        yield band
        del band  # not held while the next band is computed (`_vips_strips`)
