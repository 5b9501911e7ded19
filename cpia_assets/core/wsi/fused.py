"""standardized_wsi and scale_tiles in one pass, when both are materialized together.

The two-step path decodes the q89 TIFF that standardized_wsi has just encoded and encodes its
pixels again at q75 for the tiles. Here each slide's source is decoded and resampled once, and
the resampled pixels pass through Python in strips of one row of XL tiles: the tiles are cut
from a strip (`tiling.StripTiler`), then the same strip is written into the pyramidal TIFF. The
tiles are one JPEG generation from the resampled pixels (TILES `cut_from` = `resampled`).

Records, files, resume markers and failures are those of the two stages run one after the
other. A slide whose standardized TIFF is already done for the same source and settings is
tiled as `scale_tiles` does (reused, or cut from the stored TIFF); so is a slide whose level
libvips shrinks from an OpenSlide row stream (its pixels never reach Python), and one whose cut
failed unexpectedly (`StripTiler.error`): its TIFF is kept and the tiles are cut from it. A
slide whose standardization fails is a failure of standardized_wsi; its tiles from an earlier
run are deleted at the end, like those of every slide that is not tiled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.fsutil import OutputWriteError
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.stage import StageResult
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slide_jobs import (
    SlideJob,
    SlideOutcome,
    failed_slide_job,
    recorded_result,
    run_slide_job,
    slide_jobs,
)
from cpia_assets.core.wsi.tile_jobs import (
    TilesCollector,
    TilingJob,
    TilingOutcome,
    commit_tiles,
    failed_tiling_job,
    remove_staging,
    run_tiling_job,
    tiles_reusable,
)
from cpia_assets.core.wsi.tiling import CUT_FROM_RESAMPLED, StripTiler, TilingSettings


@dataclass(frozen=True)
class _FusedJob:
    slide: SlideJob
    key: str
    layout: DataLayout
    tiling: TilingSettings

    def tiling_job(self, record: dict | None = None) -> TilingJob:
        """The slide's tiling job; before its SLIDES `record` exists only its file is known."""
        slide = record or {"standardized_file": self.slide.standardized_file}
        return TilingJob(slide, self.key, self.layout, self.tiling)


@dataclass(frozen=True)
class _FusedOutcome:
    slide: SlideOutcome
    tiles: TilingOutcome | None = None  # None: the slide failed


def standardize_and_tile_partition(
    slide_files: Sequence[Path],
    *,
    key: str,
    layout: DataLayout,
    options: WsiOptions,
    settings: StandardizeSettings,
    tiling: TilingSettings,
    executor: Executor | None = None,
    progress: Callable[[str], None] | None = None,
    known_sha256: Mapping[Path, str] | None = None,
) -> tuple[StageResult, StageResult]:
    """`standardize_partition` and then `tile_partition` of its records, in one pass per slide
    (module docstring); returns both stages' results."""
    jobs, slides = slide_jobs(
        slide_files,
        key=key,
        layout=layout,
        options=options,
        settings=settings,
        known_sha256=known_sha256,
        progress=progress,
    )
    tiles = TilesCollector(progress)
    fused = [_FusedJob(job, key, layout, tiling) for job in jobs]
    reusable = [_reusable(job) for job in fused]
    done = [job for job, reused in zip(fused, reusable, strict=True) if reused]
    todo = [job for job, reused in zip(fused, reusable, strict=True) if not reused]
    outcomes = chain(
        map(_run_fused_job, done),  # in this process: no worker is started for them
        map_unordered(_run_fused_job, todo, executor, on_lost=_lost_job),
    )
    for outcome in outcomes:
        slides.add(outcome.slide)
        if outcome.tiles is not None:
            tiles.add(outcome.tiles)
    return slides.finish(layout, key), tiles.finish(layout, key)


def _reusable(job: _FusedJob) -> bool:
    """Whether both stages would reuse the slide: its standardized marker matches (for a
    source whose digest raw_download already knows, so nothing is read) and so does its tiles'.
    Such a job costs a few file reads; running it here spares a run with nothing to do the
    start of the worker pool (which `WorkerPool` starts at the first job submitted)."""
    record = recorded_result(job.slide)
    return record is not None and tiles_reusable(job.tiling_job(record))


def _run_fused_job(job: _FusedJob) -> _FusedOutcome:
    """Worker: standardize one slide while cutting its tiles, then commit the tiles; failures
    are recorded as each stage records them, an output-side fault is raised."""
    staging = job.tiling_job()
    remove_staging(staging)
    tiler = StripTiler(stem=staging.stem, out_dirs=staging.staging(), settings=job.tiling)
    try:
        standardized = run_slide_job(job.slide, tiler)
    except OutputWriteError:
        remove_staging(staging)
        raise
    if standardized.record is None:
        remove_staging(staging)
        return _FusedOutcome(standardized)
    tiling_job = job.tiling_job(standardized.record)
    if not tiler.complete:  # reused, an OpenSlide-only level, or the cut failed
        tiles = run_tiling_job(tiling_job)
        if tiler.error is not None:
            note = f"one-pass cut failed ({tiler.error}), cut from the stored TIFF instead"
            tiles = replace(tiles, message=f"{tiles.message} [{note}]")
        return _FusedOutcome(standardized, tiles)
    try:
        tiles = commit_tiles(tiling_job, tiler.candidates, cut_from=CUT_FROM_RESAMPLED)
    except OutputWriteError:
        remove_staging(staging)
        raise
    except Exception as exc:  # recorded, not raised, as `run_tiling_job` does
        tiles = failed_tiling_job(tiling_job, f"{type(exc).__name__}: {exc}")
    return _FusedOutcome(standardized, tiles)


def _lost_job(job: _FusedJob, cause: str) -> _FusedOutcome:
    """A slide whose worker process died twice (`parallel.map_unordered`)."""
    remove_staging(job.tiling_job())
    return _FusedOutcome(failed_slide_job(job.slide, cause))
