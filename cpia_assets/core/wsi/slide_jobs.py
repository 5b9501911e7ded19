"""standardized_wsi over a partition: one resumable job per slide, run in parallel.

Resume: `manifests/<key>/parts/standardized/<stem>.json` holds the SLIDES record and a
fingerprint of the source bytes (sha256, taken from raw_download's state file when the file is
unchanged since it was verified there, `known_sha256`), the settings and the slide's catalog
options. A rerun reuses a slide whose marker matches and whose TIFF is present; anything else
is redone. The TIFF is written to a temporary sibling and renamed into place before its marker
is written, so an interrupted slide leaves nothing at its final name. At the end of a partition
the TIFF and marker of every slide that is no longer an input or failed this time are deleted,
so the TIFFs on disk are exactly the records.

One build of a partition at a time: the caller holds the partition's lock (`core/locks.py`,
taken by the asset), since a job removes the temporaries it finds beside its output (those of
an interrupted run) and `finish` deletes what this build did not record. A temporary that
vanishes anyway, or a rename that fails, is an internal error (`OutputLostError`) and fails the
stage; only a slide that cannot be read or used is a per-slide failure.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.fsutil import OutputWriteError, atomic_path, sha256_file
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.stage import StageResult, failure
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slides import SlideError, slide_stem
from cpia_assets.core.wsi.standardize import STAGE, StripConsumer, standardize_slide

_RESUME_VERSION = 2
"""Bump when the output of the same inputs and settings changes, to redo finished slides."""


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
    full, a write that failed, a temporary that vanished: `OutputWriteError` and its
    `OutputLostError`) is raised: it is no fault of the slide, and fails the stage. `strips`
    receives the pixels of a slide that is standardized now (`standardize_slide`), never of one
    reused."""
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


def recorded_result(job: SlideJob) -> dict[str, Any] | None:
    """The slide's record when a rerun would reuse it, judged without reading the source (its
    digest known from raw_download); None when that cannot be told or it would not."""
    if job.known_sha256 is None or not job.output.is_file():
        return None
    try:
        size = job.source.stat().st_size
    except OSError:
        return None
    return _load_marker(job.marker, _fingerprint(job, job.known_sha256, size))


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
    """Temporary folders left by an interrupted run of this slide (see `fsutil.atomic_path`).
    Safe only under the partition's lock: another build's would be work in progress."""
    if output.parent.is_dir():
        for stale in output.parent.glob(f".{output.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
