"""scale_tiles over a partition: one atomic, resumable job per standardized slide.

Tiles are written to hidden staging folders (`cpia/<L|M|S>/<key>/.<stem>.tiles.tmp/`), then
`manifests/<key>/parts/tiles/<stem>.parquet` (every candidate's TILES row, kept or not) is
written, the staged files are renamed into place, and finally `<stem>.json` records the
fingerprint (standardized slide record and file, settings). A rerun reuses a slide whose
fingerprint matches; otherwise it first deletes every file the previous part file lists and any
staging folder, so no duplicates or stale tiles stay. At the end of a partition the same is done
for every slide that has a part file or marker but is no longer in the partition or failed this
time, so the files on disk are exactly the records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyvips

from cpia_assets.core import schema
from cpia_assets.core.fsutil import OutputWriteError, atomic_path, write_parquet_atomic, writing
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.stage import StageResult, failure
from cpia_assets.core.wsi.tiling import (
    CUT_FROM_TIFF,
    SCALES,
    STAGE,
    Candidate,
    TilingSettings,
    tile_slide,
)

_RESUME_VERSION = 3
"""Part of every fingerprint: bump it when the records change (3: TILES `phash`)."""


_STAGING_SUFFIX = ".tiles.tmp"


@dataclass(frozen=True)
class TilingJob:
    slide: Mapping[str, Any]  # SLIDES record
    key: str
    layout: DataLayout
    settings: TilingSettings

    @property
    def standardized(self) -> Path:
        return self.layout.root / self.slide["standardized_file"]

    @property
    def stem(self) -> str:
        return Path(self.slide["standardized_file"]).name.split(".", 1)[0]

    @property
    def part(self) -> Path:
        return _part_file(self.layout, self.key, self.stem)

    @property
    def marker(self) -> Path:
        return self.part.with_suffix(".json")

    def folders(self) -> dict[str, Path]:
        return {scale: self.layout.image_dir(scale, self.key) for scale in SCALES}

    def staging(self) -> dict[str, Path]:
        return {
            scale: folder / f".{self.stem}{_STAGING_SUFFIX}"
            for scale, folder in self.folders().items()
        }


def _parts_dir(layout: DataLayout, key: str) -> Path:
    return layout.manifest_dir(key) / "parts" / "tiles"


def _part_file(layout: DataLayout, key: str, stem: str) -> Path:
    return _parts_dir(layout, key) / f"{stem}.parquet"


@dataclass(frozen=True)
class TilingOutcome:
    stem: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    failure: dict[str, str] | None = None
    reused: bool = False
    message: str = ""


def tile_partition(
    slides: Sequence[Mapping[str, Any]],
    *,
    key: str,
    layout: DataLayout,
    settings: TilingSettings,
    executor: Executor | None = None,
    progress: Callable[[str], None] | None = None,
) -> StageResult:
    """Tile a partition's standardized slides (SLIDES records), in parallel over `executor`.

    Records: TILES rows of kept images; rejected: TILES rows (path null) of rejected
    candidates with their metrics; failures: slides that could not be tiled. Afterwards the
    outputs of slides that are not in `slides` or failed are deleted (module docstring).
    """
    jobs = [TilingJob(dict(slide), key, layout, settings) for slide in slides]
    collector = TilesCollector(progress)
    for outcome in map_unordered(run_tiling_job, jobs, executor, on_lost=failed_tiling_job):
        collector.add(outcome)
    return collector.finish(layout, key)


class TilesCollector:
    """Gathers a partition's `TilingOutcome`s into its StageResult."""

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self.result = StageResult()
        self.tiled: set[str] = set()
        self.progress = progress

    def add(self, outcome: TilingOutcome) -> None:
        for row in outcome.rows:
            (self.result.records if row["path"] else self.result.rejected).append(row)
        if outcome.failure is None:
            self.tiled.add(outcome.stem)
        else:
            self.result.failures.append(outcome.failure)
        self.result.reused += outcome.reused
        if self.progress:
            self.progress(outcome.message)

    def finish(self, layout: DataLayout, key: str) -> StageResult:
        """The result, once the outputs of every slide not tiled this time are deleted."""
        result = self.result
        result.failures.extend(_remove_untiled_slides(layout, key, keep=self.tiled))
        result.records.sort(key=_row_order)
        result.rejected.sort(key=_row_order)
        return result


def _row_order(row: Mapping[str, Any]) -> tuple[str, int, int, int]:
    return row["source_file"], -row["size_px"], row["y"], row["x"]


def run_tiling_job(job: TilingJob) -> TilingOutcome:
    """Worker: tile one slide, or reuse it when its fingerprint matches; any error becomes
    the slide's failure (its staging folders removed) so that its siblings still finish,
    except an output-side fault (disk full), which is no fault of the slide and is raised."""
    try:
        return _tile_or_reuse(job)
    except OutputWriteError:  # the slide's outputs were removed before it was redone
        _remove_previous_outputs(job.layout, job.key, job.stem)
        remove_staging(job)
        raise
    except pyvips.Error as exc:
        return failed_tiling_job(job, f"cannot read the standardized slide: {exc}")
    except Exception as exc:  # recorded, not raised: see the docstring
        return failed_tiling_job(job, f"{type(exc).__name__}: {exc}")


def failed_tiling_job(job: TilingJob, cause: str) -> TilingOutcome:
    """The failure of a slide that raised or whose worker process died twice
    (`parallel.map_unordered`); its staging folders are removed."""
    remove_staging(job)
    slide_file = job.slide["standardized_file"]
    reason = f"{slide_file}: {cause}"
    return TilingOutcome(job.stem, failure=failure(slide_file, STAGE, reason), message=reason)


def _tile_or_reuse(job: TilingJob) -> TilingOutcome:
    slide_file = job.slide["standardized_file"]
    try:
        stat = job.standardized.stat()
    except OSError as exc:
        reason = f"{slide_file}: standardized slide missing: {exc}"
        return TilingOutcome(job.stem, failure=failure(slide_file, STAGE, reason), message=reason)
    fingerprint = _fingerprint(job, stat)
    if _marker_matches(job.marker, fingerprint) and job.part.is_file():
        rows = pl.read_parquet(job.part).to_dicts()
        kept = sum(1 for row in rows if row["path"])
        message = f"slide {job.stem}: already tiled ({kept} images)"
        return TilingOutcome(job.stem, rows=rows, reused=True, message=message)
    _remove_previous_outputs(job.layout, job.key, job.stem)
    remove_staging(job)
    candidates = tile_slide(
        job.standardized, stem=job.stem, out_dirs=job.staging(), settings=job.settings
    )
    return commit_tiles(job, candidates, cut_from=CUT_FROM_TIFF)


def tiles_reusable(job: TilingJob) -> bool:
    """Whether `run_tiling_job` would reuse the slide's tiles (its fingerprint matches)."""
    try:
        stat = job.standardized.stat()
    except OSError:
        return False
    return _marker_matches(job.marker, _fingerprint(job, stat)) and job.part.is_file()


def commit_tiles(
    job: TilingJob, candidates: Sequence[Candidate], *, cut_from: str
) -> TilingOutcome:
    """Record the slide's candidates (staged under `job.staging()`) and move its kept tiles
    into place, replacing an earlier run's (module docstring); `cut_from` says which pixels
    the tiles were cut from."""
    try:
        _remove_previous_outputs(job.layout, job.key, job.stem)
        fingerprint = _fingerprint(job, job.standardized.stat())
        folders = job.folders()
        stored = {scale: job.layout.relative(folder) for scale, folder in folders.items()}
        rows = [_tiles_row(job, candidate, stored, cut_from) for candidate in candidates]
        write_parquet_atomic(schema.frame(rows, schema.TILES), job.part)
        for candidate in candidates:
            if candidate.file is not None:
                final = folders[candidate.scale] / candidate.file.name
                with writing(final):
                    candidate.file.replace(final)
        remove_staging(job)
        with atomic_path(job.marker) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint}))
    except OutputWriteError:  # nothing half-moved stays
        _remove_previous_outputs(job.layout, job.key, job.stem)
        remove_staging(job)
        raise
    return TilingOutcome(job.stem, rows=rows, message=_summary(job.stem, candidates))


def _tiles_row(
    job: TilingJob, candidate: Candidate, stored_folders: Mapping[str, str], cut_from: str
) -> dict:
    """The candidate's TILES row; `stored_folders`: each scale's folder as records store it."""
    slide = job.slide
    row: dict[str, Any] = dict.fromkeys(schema.TILES) | {
        "image_name": candidate.name,
        "subdataset": job.key,
        "kind": "wsi",
        "scale": candidate.scale,
        "size_px": candidate.size,
        "x": candidate.x,
        "y": candidate.y,
        "source_file": slide["source_file"],
        "source_sha256": slide["source_sha256"],
        "standardized_file": slide["standardized_file"],
        "path": None,
        "parent_image": candidate.parent,
        "split": "none",
        "cut_from": cut_from,
        **candidate.metrics,
    }
    if candidate.file is not None:
        row["path"] = f"{stored_folders[candidate.scale]}/{candidate.file.name}"
        row["bytes"] = candidate.file.stat().st_size
        row["phash"] = candidate.phash
    return row


def _summary(stem: str, candidates: Sequence[Candidate]) -> str:
    kept = dict.fromkeys(SCALES, 0)
    for candidate in candidates:
        kept[candidate.scale] += candidate.file is not None
    xl_candidates = sum(1 for candidate in candidates if candidate.scale == "XL")
    if not xl_candidates:
        return f"slide {stem}: no XL tile fits (smaller than one XL tile)"
    return (
        f"slide {stem}: {kept['XL']} XL tiles kept of {xl_candidates} "
        f"({kept['L']} L, {kept['M']} M, {kept['S']} S)"
    )


def _fingerprint(job: TilingJob, stat: os.stat_result) -> str:
    """Hash of what the tiles depend on: the slide's SLIDES fields (not the lineage columns,
    such as `run_id`, that the caller may pass along), its file and the settings."""
    identity = {
        "version": _RESUME_VERSION,
        "slide": {name: job.slide.get(name) for name in schema.SLIDES},
        "standardized": [stat.st_size, stat.st_mtime_ns],
        "settings": asdict(job.settings),
    }
    encoded = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def _marker_matches(marker: Path, fingerprint: str) -> bool:
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def remove_staging(job: TilingJob) -> None:
    for staging in job.staging().values():
        shutil.rmtree(staging, ignore_errors=True)


def _remove_previous_outputs(layout: DataLayout, key: str, stem: str) -> None:
    """The part file and marker of an earlier (finished or interrupted) run of slide `stem`
    and the tile files that part file lists: only files this stage wrote."""
    part = _part_file(layout, key, stem)
    part.with_suffix(".json").unlink(missing_ok=True)
    if part.is_file():
        for path in pl.read_parquet(part, columns=["path"])["path"].drop_nulls():
            (layout.root / path).unlink(missing_ok=True)
        part.unlink()


def _remove_untiled_slides(layout: DataLayout, key: str, *, keep: set[str]) -> list[dict[str, str]]:
    """Delete the outputs of every slide with a part file or marker whose stem is not in
    `keep`, and all staging folders (every job has finished); returns a failure per slide
    whose outputs could not be removed."""
    parts = _parts_dir(layout, key)
    stems = {path.stem for pattern in ("*.parquet", "*.json") for path in parts.glob(pattern)}
    failures = []
    for stem in sorted(stems - keep):
        try:
            _remove_previous_outputs(layout, key, stem)
        except (OSError, pl.exceptions.PolarsError) as exc:
            part = layout.relative(_part_file(layout, key, stem))
            reason = f"{part}: cannot remove the tiles of a slide no longer tiled: {exc}"
            failures.append(failure(part, STAGE, reason))
    for folder in {layout.image_dir(scale, key) for scale in SCALES}:
        for staging in folder.glob(f".*{_STAGING_SUFFIX}"):
            shutil.rmtree(staging, ignore_errors=True)
    return failures
