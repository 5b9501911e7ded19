"""standardized_wsi: every slide resampled to one target MPP and written as a pyramidal TIFF.

Per slide: resolve the MPP (`slides.resolve_mpp`), pick the coarsest pyramid level that is not
coarser than the target, resample it and write a tiled JPEG TIFF pyramid whose resolution tags
make OpenSlide report the output MPP. Nothing is snapped: a 0.499 um/px slide is enlarged by
1.63% to reach 0.491, unless a `tolerance` is set, in which case slides within it are copied at
their own MPP (`resampled` is False in the record).

Filters: area-style when shrinking, Lanczos-3 when enlarging.
- Shrinking on both axes (40x slides, the bulk of the pixels) runs in libvips as one lazy
  pipeline, decode -> resample -> `tiffsave` (`shrink_image`): an exact box filter (`shrink`)
  for the integer part of the factor and, for the fractional rest, `reduce` with the linear
  kernel, which libvips widens to the output pixel's footprint (an area-weighted, non-negative
  average, no ringing). libvips has no box filter for fractional factors; its `shrink` falls
  back to Lanczos-3 there. Pillow's fractional box costs about 2 s more per 16k x 16k slide.
- Any enlarging axis (most 20x slides) needs Lanczos-3, which libvips cannot enlarge with
  (`reduce` only shrinks; `resize` enlarges with bicubic), so those slides are resampled by
  Pillow in row bands (`resample_rows`: Lanczos-3 across an enlarging axis, box across a
  shrinking one) and reach libvips as an uncompressed PNG stream (`_PngRowStream`).
Levels that libvips cannot decode (OpenSlide-only formats) also arrive as a PNG row stream.
When the tiles are cut in the same pass (`core/fused.py`), a `StripConsumer` sees the output
pixels on their way into the TIFF: shrunk levels are then computed by libvips one strip of
output rows at a time and reach `tiffsave` as a PNG row stream too.

Streaming: libvips pulls source tiles on demand and writes the pyramid strip by strip; Pillow
bands hold about `_BAND_BYTES` of source rows plus the filter margin. Memory therefore depends
on the slide width, never on its height or area.

Resume: `manifests/<key>/parts/standardized/<stem>.json` holds the SLIDES record and a
fingerprint of the source bytes (sha256, taken from raw_download's state file when the file is
unchanged since it was verified there, `known_sha256`), the settings and the slide's catalog
options. A rerun reuses a slide whose marker matches and whose TIFF is present; anything else
is redone. The TIFF is written to a temporary sibling and renamed into place before its marker
is written, so an interrupted slide leaves nothing at its final name. At the end of a partition
the TIFF and marker of every slide that is no longer an input or failed this time are deleted,
so the TIFFs on disk are exactly the records.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import select
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyvips
from PIL import Image

from cpia_assets.core.catalog import WsiOptions
from cpia_assets.core.fsutil import OutputWriteError, atomic_path, output_fault, sha256_file
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.slides import (
    Mpp,
    SlideError,
    SlideInfo,
    SlideReader,
    SlideReadError,
    open_slide,
    slide_stem,
)
from cpia_assets.core.stage import StageResult, failure

STAGE = "standardized_wsi"
_BAND_BYTES = 16 << 20
"""Source pixels held per band (RGB bytes); bounds memory whatever the slide size."""
_RESUME_VERSION = 2
"""Bump when the output of the same inputs and settings changes, to redo finished slides."""
_BIGTIFF_ABOVE = 3 << 30
_F_SETPIPE_SZ = 1031  # fcntl command (Linux)
_PIPE_BYTES = 1 << 20
_FEED_WAIT_S = 0.2


class StripConsumer(Protocol):
    """Receives the standardized pixels as they are written (the fused path, `core/fused.py`):
    `begin` with the output size, then consecutive bands of `rows` rows (the last one may be
    shorter), top to bottom."""

    rows: int

    def begin(self, size: tuple[int, int]) -> None: ...

    def __call__(self, strip: np.ndarray) -> None: ...


class StandardizeError(Exception):
    """Standardization of one slide failed for a reason that is not the slide's fault."""


@dataclass(frozen=True)
class StandardizeSettings:
    """How slides are standardized. `tolerance` is relative (0.02 = within 2% of the target
    MPP on both axes is left unresampled); 0 resamples every slide exactly.

    `jpeg_quality` of the TIFF's tiles: at 90 and above libvips writes them as RGB (4:4:4
    chroma), below 90 as YCbCr with 4:2:0 chroma, as scanners do. On tissue, 89 gives files
    2.7x smaller than 90, encodes 1.8x faster and errs 1.5x more (mean absolute difference
    from the resampled pixels 3.0 instead of 2.0 on the real CMU-1 slide); see
    `benchmarks/bench_tiling.py --tiff-quality`."""

    target_mpp: float = 0.491
    tolerance: float = 0.0
    jpeg_quality: int = 90
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


@dataclass(frozen=True)
class ResamplePlan:
    """Which level is read and how it maps onto the output (scales are output px per level px)."""

    level: int
    level_size: tuple[int, int]
    scale: tuple[float, float]
    output_size: tuple[int, int]
    output_mpp: tuple[float, float]

    @property
    def resampled(self) -> bool:
        return self.scale != (1.0, 1.0)

    @property
    def enlarges(self) -> bool:
        return max(self.scale) > 1.0


def plan_resample(info: SlideInfo, mpp: Mpp, settings: StandardizeSettings) -> ResamplePlan:
    """Choose the level and scale that bring the slide to `settings.target_mpp`.

    The level is the coarsest one whose MPP is still at or below the target on both axes, so
    detail is never invented by reading a level coarser than the output. The output size is
    floored so that every output pixel lies inside the slide.
    """
    target = settings.target_mpp
    width0, height0 = info.dimensions
    near_x = abs(mpp.x / target - 1) <= settings.tolerance
    near_y = abs(mpp.y / target - 1) <= settings.tolerance
    if settings.tolerance > 0 and near_x and near_y:
        return ResamplePlan(0, (width0, height0), (1.0, 1.0), (width0, height0), (mpp.x, mpp.y))
    level = 0
    for candidate, (width, height) in enumerate(info.level_dimensions):
        level_mpp_x = mpp.x * width0 / width
        level_mpp_y = mpp.y * height0 / height
        if level_mpp_x <= target * (1 + 1e-9) and level_mpp_y <= target * (1 + 1e-9):
            level = candidate
    width, height = info.level_dimensions[level]
    scale_x = mpp.x * width0 / width / target
    scale_y = mpp.y * height0 / height / target
    output = (
        max(1, math.floor(width * scale_x + 1e-6)),
        max(1, math.floor(height * scale_y + 1e-6)),
    )
    return ResamplePlan(level, (width, height), (scale_x, scale_y), output, (target, target))


def resample_rows(
    rows: Iterable[np.ndarray], plan: ResamplePlan, *, band_rows: int
) -> Iterator[np.ndarray]:
    """The resampled level, `band_rows` output rows at a time, from source rows given in order.

    Separable, per axis: box (area) filter where that axis shrinks, Lanczos-3 where it enlarges.
    Each source chunk is resampled horizontally once as it arrives; each output band is then
    resampled vertically from a window padded by the filter's support, with PIL's sub-pixel
    `box`, so the bands equal one whole-level horizontal-then-vertical resize (up to float
    rounding of filter windows that fall exactly on a pixel edge). Source rows are dropped as
    soon as no later band needs them.
    """
    if not plan.resampled:
        yield from rows
        return
    height, (scale_x, scale_y) = plan.level_size[1], plan.scale
    out_width, out_height = plan.output_size
    horizontal_filter, _ = _filter_for(scale_x)
    vertical_filter, support = _filter_for(scale_y)
    margin = math.ceil(support * max(1.0, 1.0 / scale_y)) + 2
    box_right = out_width / scale_x
    source = iter(rows)
    buffer = np.empty((0, out_width, 3), np.uint8)
    buffer_top = 0
    for out_top in range(0, out_height, band_rows):
        out_bottom = min(out_height, out_top + band_rows)
        top, bottom = out_top / scale_y, out_bottom / scale_y
        needed_top = max(0, math.floor(top) - margin)
        needed_bottom = min(height, math.ceil(bottom) + margin)
        chunks = [buffer[needed_top - buffer_top :]]
        available = buffer_top + len(buffer)
        while available < needed_bottom:
            chunk = next(source, None)
            if chunk is None:
                raise StandardizeError(f"source rows ended at {available} of {height}")
            box = (0, 0, box_right, len(chunk))
            resized = Image.fromarray(chunk).resize((out_width, len(chunk)), horizontal_filter, box)
            chunks.append(np.asarray(resized))
            available += len(chunk)
        buffer = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        buffer_top = needed_top
        window = Image.fromarray(buffer[: needed_bottom - buffer_top])
        box = (0, top - buffer_top, out_width, bottom - buffer_top)
        yield np.asarray(window.resize((out_width, out_bottom - out_top), vertical_filter, box))


def _filter_for(scale: float) -> tuple[Image.Resampling, float]:
    """PIL filter and its support (in output px) for one axis: area when shrinking."""
    if scale <= 1:
        return Image.Resampling.BOX, 0.5
    return Image.Resampling.LANCZOS, 3.0


def shrink_image(image: pyvips.Image, plan: ResamplePlan) -> pyvips.Image:
    """`image` (the plan's level) brought to the plan's output size by shrinking only: exact
    box averages over whole blocks of `floor(1 / scale)` pixels, then the linear kernel of
    `reduce` (widened to the footprint) for the fractional rest."""
    if plan.enlarges:
        raise ValueError(f"shrink_image cannot enlarge (scale {plan.scale})")
    return shrink_by(image, [1 / scale for scale in plan.scale]).crop(0, 0, *plan.output_size)


def shrink_by(image: pyvips.Image, factors: Sequence[float]) -> pyvips.Image:
    """`image` shrunk by (x, y) `factors` >= 1 with the area-style filter of `shrink_image`."""
    whole = [max(1, math.floor(factor + 1e-9)) for factor in factors]
    if max(whole) > 1:
        image = image.shrink(*whole)
    rest = [factor / block for factor, block in zip(factors, whole, strict=True)]
    if max(rest) > 1 + 1e-9:
        image = image.reduce(*rest, kernel="linear")
    return image


class _PngRowStream:
    """An uncompressed PNG built on the fly from RGB row bands and written into a pipe that
    libvips reads (`write_pyramid_tiff`).

    libvips-binary has no raw or PPM source loader, and a PNG with stored (level 0) deflate
    blocks costs only a copy and two checksums per byte. The rows are produced in a thread of
    our own (`feed`), not in a read callback: that would run the producer's work (in the fused
    path, computing strips with libvips and cutting tiles) nested inside libvips' worker
    threads, whose per-thread buffers then grew the peak memory strip after strip. An exception
    raised while producing rows (e.g. a corrupt source tile) is kept in `error` and the pipe is
    closed early, which makes libvips fail; the caller re-raises `error`.
    """

    def __init__(self, width: int, height: int, bands: Iterable[np.ndarray]) -> None:
        self.width, self.height = width, height
        self.rows_sent = 0
        self.error: BaseException | None = None
        self._bands = iter(bands)

    def feed(self, descriptor: int, stop: threading.Event) -> None:
        """Write the PNG into the pipe's write end `descriptor` and close it; returns early,
        leaving the PNG unfinished, once `stop` is set (the reader has given up)."""
        try:
            os.set_blocking(descriptor, False)
            for piece in self._png_chunks(self._bands):
                view = memoryview(piece)
                while view:
                    try:
                        view = view[os.write(descriptor, view) :]
                    except BlockingIOError:
                        if stop.is_set():
                            return
                        select.select([], [descriptor], [], _FEED_WAIT_S)
        except BrokenPipeError:
            return  # libvips stopped reading: its own error is the one to report
        except Exception as exc:  # re-raised by the caller, see the class docstring
            self.error = exc
        finally:
            os.close(descriptor)

    def _png_chunks(self, bands: Iterator[np.ndarray]) -> Iterator[bytes]:
        """The PNG's bytes in pieces; pixel data, most of what passes here, is copied once (by
        zlib, which reads each row in place)."""
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        yield b"\x89PNG\r\n\x1a\n"
        yield from _png_chunk(b"IHDR", header)
        deflate = zlib.compressobj(0)
        filter_none = b"\x00"  # each row's filter type byte
        for band in bands:
            if band.shape[1:] != (self.width, 3):
                raise StandardizeError(f"band of shape {band.shape} for width {self.width}")
            for row in np.ascontiguousarray(band):
                for data in (deflate.compress(filter_none), deflate.compress(row)):
                    if data:
                        yield from _png_chunk(b"IDAT", data)
            self.rows_sent += len(band)
            band = row = None  # not held while the next band is computed (`_vips_strips`)
        yield from _png_chunk(b"IDAT", deflate.flush())
        yield from _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """A PNG chunk in three pieces (length and type, data, CRC), so `data` is not copied."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind, data, struct.pack(">I", crc)


def save_pyramid(
    image: pyvips.Image, dest: Path, *, mpp: tuple[float, float], settings: StandardizeSettings
) -> None:
    """Write `image` as a tiled JPEG TIFF pyramid whose resolution tags give `mpp`."""
    image.tiffsave(
        str(dest),
        tile=True,
        tile_width=settings.tiff_tile_px,
        tile_height=settings.tiff_tile_px,
        pyramid=True,
        compression="jpeg",
        Q=settings.jpeg_quality,
        xres=1000.0 / mpp[0],  # pixels per millimetre
        yres=1000.0 / mpp[1],
        resunit="cm",
        bigtiff=image.width * image.height * 3 > _BIGTIFF_ABOVE,
    )


def write_pyramid_tiff(
    dest: Path,
    bands: Iterable[np.ndarray],
    *,
    size: tuple[int, int],
    mpp: tuple[float, float],
    settings: StandardizeSettings,
    transform: Callable[[pyvips.Image], pyvips.Image] | None = None,
) -> None:
    """Stream RGB row bands of a `size` image, passed through the lazy libvips `transform`
    when given, into a pyramid (`save_pyramid`)."""
    width, height = size
    stream = _PngRowStream(width, height, bands)
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # a larger pipe buffer where the system allows it
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_BYTES)
    stop = threading.Event()
    feeder = threading.Thread(target=stream.feed, args=(write_end, stop), name="png-rows")
    feeder.start()
    try:
        source = pyvips.Source.new_from_descriptor(read_end)  # libvips reads a copy of it
        image = pyvips.Image.new_from_source(source, "", access="sequential")
        save_pyramid(transform(image) if transform else image, dest, mpp=mpp, settings=settings)
    except pyvips.Error as exc:
        if stream.error is not None:
            raise stream.error from exc
        raise
    finally:
        os.close(read_end)
        stop.set()
        feeder.join()
        trim_operation_cache()  # the cached load holds libvips' copy of the read end
    if stream.error is not None:
        raise stream.error
    if stream.rows_sent != height:
        raise StandardizeError(f"{dest.name}: {stream.rows_sent} rows written, {height} expected")


def trim_operation_cache() -> None:
    """Empty libvips' operation cache, whose entries hold their inputs alive: the memory of a
    strip that was cropped, the pipe a stream was loaded from."""
    limit = pyvips.cache_get_max()
    pyvips.cache_set_max(0)
    pyvips.cache_set_max(limit)


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
    cannot be decoded."""
    try:
        yield
    except pyvips.Error as exc:
        if output_fault(exc, dest):
            raise  # disk full ...: no fault of the slide; `atomic_path` names the final path
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


@dataclass(frozen=True)
class SlideJob:
    source: Path
    output: Path
    marker: Path
    source_file: str  # as stored in records
    standardized_file: str
    options: WsiOptions
    settings: StandardizeSettings
    known_sha256: str | None = None  # the source's digest, when already known


@dataclass(frozen=True)
class SlideOutcome:
    source_file: str
    record: dict[str, Any] | None = None
    failure: dict[str, str] | None = None
    reused: bool = False
    message: str = ""


def standardize_partition(
    slide_files: Sequence[Path],
    *,
    key: str,
    layout: DataLayout,
    options: WsiOptions,
    settings: StandardizeSettings,
    executor: Executor | None = None,
    progress: Callable[[str], None] | None = None,
    known_sha256: Mapping[Path, str] | None = None,
) -> StageResult:
    """Standardize a partition's slides (in parallel over `executor`) into
    `standardized/<key>/<stem>.tiff`; one SLIDES record per slide done or reused, one failure
    per slide that could not be used (the others finish). Afterwards the outputs of slides
    without a record are deleted (module docstring). `known_sha256`: digests of source files
    that need not be read again (`downloads.state.verified_digests`)."""
    jobs, collector = slide_jobs(
        slide_files,
        key=key,
        layout=layout,
        options=options,
        settings=settings,
        known_sha256=known_sha256,
        progress=progress,
    )
    for outcome in map_unordered(run_slide_job, jobs, executor, on_lost=failed_slide_job):
        collector.add(outcome)
    return collector.finish(layout, key)


def slide_jobs(
    slide_files: Sequence[Path],
    *,
    key: str,
    layout: DataLayout,
    options: WsiOptions,
    settings: StandardizeSettings,
    known_sha256: Mapping[Path, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[SlideJob], SlidesCollector]:
    """One job per slide, and the collector of their outcomes (reporting each to `progress`),
    which already holds the failures of slides whose name another slide of the partition
    uses."""
    collector = SlidesCollector(progress)
    jobs = []
    owners: dict[str, Path] = {}
    for source in sorted(Path(p) for p in slide_files):
        stem = slide_stem(source)
        stored = layout.stored(source)
        if stem in owners:
            reason = f"slide name {stem!r} is already used by {owners[stem].name}; rename one"
            collector.result.failures.append(failure(stored, STAGE, f"{source.name}: {reason}"))
            continue
        owners[stem] = source
        output = layout.standardized_dir(key) / f"{stem}.tiff"
        jobs.append(
            SlideJob(
                source=source,
                output=output,
                marker=_markers_dir(layout, key) / f"{stem}.json",
                source_file=stored,
                standardized_file=layout.stored(output),
                options=options,
                settings=settings,
                known_sha256=(known_sha256 or {}).get(source),
            )
        )
    return jobs, collector


class SlidesCollector:
    """Gathers a partition's `SlideOutcome`s into its StageResult."""

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self.result = StageResult()
        self.progress = progress

    def add(self, outcome: SlideOutcome) -> None:
        if outcome.record is not None:
            self.result.records.append(outcome.record)
        if outcome.failure is not None:
            self.result.failures.append(outcome.failure)
        self.result.reused += outcome.reused
        if self.progress:
            self.progress(outcome.message)

    def finish(self, layout: DataLayout, key: str) -> StageResult:
        """The result, once the outputs of slides without a record are deleted."""
        result = self.result
        keep = {Path(record["standardized_file"]).stem for record in result.records}
        _remove_unrecorded_slides(layout, key, keep=keep)
        result.records.sort(key=lambda record: record["source_file"])
        result.failures.sort(key=lambda row: row["file"])
        return result


def run_slide_job(job: SlideJob, strips: StripConsumer | None = None) -> SlideOutcome:
    """Worker: one slide, reused when its marker matches, failures recorded not raised (an
    unexpected error too, so that the siblings still finish). An output-side fault (disk
    full) is raised: it is no fault of the slide, and fails the stage. `strips` receives the
    pixels of a slide that is standardized now (`standardize_slide`), never of one reused."""
    try:
        return _standardize_or_reuse(job, strips)
    except OutputWriteError:
        raise
    except Exception as exc:  # recorded, not raised: see the docstring
        return failed_slide_job(job, f"{type(exc).__name__}: {exc}")


def failed_slide_job(job: SlideJob, cause: str) -> SlideOutcome:
    """The failure of a slide whose work raised unexpectedly or whose worker process died
    twice (`parallel.map_unordered`); its temporaries are removed."""
    _remove_stale_temporaries(job.output)
    return SlideOutcome(
        job.source_file,
        failure=failure(job.source_file, STAGE, f"{job.source.name}: {cause}"),
        message=f"slide {job.source.name}: failed: {cause}",
    )


def _standardize_or_reuse(job: SlideJob, strips: StripConsumer | None) -> SlideOutcome:
    name = job.source.name
    try:
        source_bytes = job.source.stat().st_size
        source_sha256 = job.known_sha256 or sha256_file(job.source)
    except OSError as exc:
        reason = f"{name}: cannot read the file: {exc}"
        return SlideOutcome(job.source_file, failure=failure(job.source_file, STAGE, reason))
    fingerprint = _fingerprint(job, source_sha256, source_bytes)
    done = _load_marker(job.marker, fingerprint)
    if done is not None and job.output.is_file():
        return SlideOutcome(
            job.source_file, record=done, reused=True, message=f"slide {name}: already done"
        )
    _remove_stale_temporaries(job.output)
    try:
        fields = standardize_slide(
            job.source, job.output, options=job.options, settings=job.settings, strips=strips
        )
    except SlideError as exc:
        return SlideOutcome(
            job.source_file,
            failure=failure(job.source_file, STAGE, str(exc)),
            message=f"slide {name}: failed: {exc.reason}",
        )
    record = {
        "source_file": job.source_file,
        "source_bytes": source_bytes,
        "source_sha256": source_sha256,
        **fields,
        "standardized_file": job.standardized_file,
    }
    with atomic_path(job.marker) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "record": record}, indent=1))
    how = f"x{record['scale_factor']:.4f}" if record["resampled"] else "not resampled"
    message = (
        f"slide {name}: {record['std_width']}x{record['std_height']} px at "
        f"{job.settings.target_mpp} um/px from level {record['level']} ({how}, "
        f"MPP {record['mpp_x']:.4f} from {record['mpp_origin']})"
    )
    return SlideOutcome(job.source_file, record=record, message=message)


def _fingerprint(job: SlideJob, source_sha256: str, source_bytes: int) -> str:
    options = job.options
    overrides = options.mpp_overrides
    names = (job.source.name, job.source.stem, slide_stem(job.source))
    identity = {
        "version": _RESUME_VERSION,
        "source_sha256": source_sha256,
        "source_bytes": source_bytes,
        "settings": asdict(job.settings),
        "mpp_override": next((overrides[n] for n in names if n in overrides), None),
        "use_objective_power": options.use_objective_power,
        "allow_plain_images": options.allow_plain_images,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _load_marker(marker: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return done["record"] if done.get("fingerprint") == fingerprint else None


def _markers_dir(layout: DataLayout, key: str) -> Path:
    return layout.manifest_dir(key) / "parts" / "standardized"


def _remove_unrecorded_slides(layout: DataLayout, key: str, *, keep: set[str]) -> None:
    """Delete the TIFF and marker of every slide whose stem is not in `keep`, and every
    temporary folder (all jobs have finished). Only this stage's output and marker folders
    are looked at, never the inputs."""
    outputs, markers = layout.standardized_dir(key), _markers_dir(layout, key)
    for folder, suffix in ((outputs, ".tiff"), (markers, ".json")):
        for path in folder.glob(f"*{suffix}"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
        for stale in folder.glob(f".*{suffix}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary folders left by an interrupted run of this slide (see `fsutil.atomic_path`)."""
    if output.parent.is_dir():
        for stale in output.parent.glob(f".{output.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
