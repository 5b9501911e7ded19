"""ROI sub-datasets: every source image centre-cropped to a square, resized and saved as JPEG,
under the scale folder and with the label and split the catalog gives it.

One image's decoding, crop and resize: `images.py`.

Scale and names: each image goes to the folder of the scale the catalog gives its path
(`SubDataset.scale_for`; None = not used in CPIA) and keeps its original stem. Within one scale
folder, sources whose stems are equal ignoring case collide (`a/x.png` and `b/x.png`, or `x.png`
and `x.tif`); every colliding source is named `<stem>__<first 8 hex digits of the SHA-1 of its
path relative to the source folder, UTF-8>`. Names depend only on the set of source paths, so
reruns give the same names.

Sources: the image files under the source folder, plus the patches of HDF5 patch arrays (PCam)
unpacked first into `unpacked/<key>/` (`patch_arrays`), whose relative paths the catalog's rules
see as if they sat in the source folder (`<array file stem>/<label>/<index>.png`).

Labels and splits come from the entry's rules (`labels`); an entry whose split rule is
`{from: stratified}` gets the declared seeded stratified split over all its images, and a labelled
set with train and test but no val gets a validation part carved from train (`splits`).

Resume: each JPEG carries in its comment a JSON stamp with the source's SHA-256, the settings
that made it, its colour metrics and the perceptual hash of its pixels (`perceptual.phash`, taken
before encoding). A rerun finds images whose stamp matches their source bytes and settings and
re-encodes none of them (`StageResult.reused`); a stamp that lacks a field (written before the
field existed) does not match. Outputs no longer expected (source gone, renamed, moved to
another scale or now failing) and stale temporary files left by an interrupted run are removed.
Every JPEG is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from cpia_assets.core.catalog.fields import ROI_SCALES
from cpia_assets.core.catalog.labels import AnnotationError, Annotator
from cpia_assets.core.catalog.model import SubDataset
from cpia_assets.core.catalog.rules import CsvRule, ListedRule, StratifiedSplit
from cpia_assets.core.catalog.splits import carve_validation, stratified_split
from cpia_assets.core.fsutil import atomic_path, sha256_file, walk_visible
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.perceptual import phash
from cpia_assets.core.roi.images import RoiImageError, RoiSettings, load_square
from cpia_assets.core.roi.patch_arrays import array_stem, unpack_patch_arrays
from cpia_assets.core.stage import RawSelection, StageResult, failure

STAGE = "standardized_wsi"  # the asset that runs ROI standardization
ROI_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


class RoiError(Exception):
    """An ROI partition that cannot be processed at all (names the folder or entry and why)."""


def find_roi_images(source_dir: Path, annotation_files: Collection[str] = ()) -> RawSelection:
    """Image files under `source_dir` by extension, recursively, sorted by relative path; every
    other file is skipped with its reason (`annotation_files`: the catalog's label and split
    tables, relative paths).

    Hidden files and folders (name starting with '.', e.g. macOS `._x.jpg` resource forks) are
    not looked at; symbolic links to folders are followed (`fsutil.walk_visible`).
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise RoiError(f"{source_dir}: the ROI source folder does not exist")
    walk = walk_visible(source_dir)
    selection = RawSelection(refused=walk.refused)
    for path, relative in walk.files:
        suffix = path.suffix.lower()
        if suffix in ROI_EXTENSIONS:
            selection.used.append(path)
        elif relative in annotation_files:
            selection.skipped.append((relative, "label or split table of the catalog"))
        elif array_stem(path) is not None:
            selection.skipped.append((relative, "HDF5 patch arrays: unpacked, then standardized"))
        else:
            known = ", ".join(sorted(ROI_EXTENSIONS))
            reason = f"not an image of a known type ({suffix or 'no extension'}; known: {known})"
            selection.skipped.append((relative, reason))
    return selection


def output_stems(relative_paths: Iterable[str]) -> dict[str, str]:
    """Output file stem of each source of ONE scale folder (see the module docstring)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for relative in relative_paths:
        groups[PurePosixPath(relative).stem.casefold()].append(relative)
    stems = {}
    for members in groups.values():
        for relative in members:
            stem = PurePosixPath(relative).stem
            if len(members) > 1:
                path_bytes = relative.encode("utf-8", "surrogateescape")
                stem += "__" + hashlib.sha1(path_bytes).hexdigest()[:8]
            stems[relative] = stem
    return stems


def standardize_roi_partition(
    entry: SubDataset,
    *,
    source_dir: Path,
    layout: DataLayout,
    settings: RoiSettings,
    executor: Executor | None = None,
    progress: Callable[[str], None] | None = None,
    known_sha256: Mapping[Path, str] | None = None,
) -> StageResult:
    """Standardize every image of one ROI sub-dataset; TILES records, one per saved image.
    `known_sha256`: digests of source files that need not be read again to tell whether an
    output is current (`downloads.state.verified_digests`).

    Images a label or split rule cannot place and images that cannot be decoded are recorded as
    failures. Files that are not images, the catalog's label tables and images the catalog gives
    no scale are recorded as skipped, with the reason.
    """
    if entry.kind != "roi":
        raise RoiError(f"sub-dataset {entry.key!r} is a {entry.kind} sub-dataset, not roi")
    unpacked_dir = layout.unpacked_dir(entry.key)
    unpack_failures = unpack_patch_arrays(
        source_dir,
        unpacked_dir,
        stage=STAGE,
        stored_prefix=layout.stored(source_dir),
        executor=executor,
    )
    roots = (Path(source_dir), unpacked_dir) if unpacked_dir.is_dir() else (Path(source_dir),)
    jobs, result = _plan_jobs(entry, roots=roots, layout=layout, known_sha256=known_sha256 or {})
    result.failures[:0] = unpack_failures
    crop_fraction = entry.crop.fraction if entry.crop else 1.0
    chunks = [
        _Chunk(
            jobs=tuple(jobs[start : start + settings.chunk_size]),
            subdataset=entry.key,
            settings=settings,
            crop_fraction=crop_fraction,
        )
        for start in range(0, len(jobs), settings.chunk_size)
    ]
    done = 0
    for outcomes in map_unordered(_standardize_chunk, chunks, executor, on_lost=_lost_chunk):
        for outcome in outcomes:
            result.reused += outcome.reused
            if outcome.record is not None:
                result.records.append(outcome.record)
            if outcome.failure is not None:
                result.failures.append(outcome.failure)
        done += len(outcomes)
        if progress:
            progress(
                f"{entry.key}: {done}/{len(jobs)} images, {result.reused} reused, "
                f"{len(result.failures)} failed"
            )
    result.records.sort(key=lambda record: record["path"])
    result.failures.sort(key=lambda row: row["file"])
    saved = {record["path"] for record in result.records}
    kept = {job.output for job in jobs if job.path in saved}
    _remove_stale_outputs([layout.image_dir(scale, entry.key) for scale in ROI_SCALES], kept)
    return result


def _plan_jobs(
    entry: SubDataset,
    *,
    roots: tuple[Path, ...],
    layout: DataLayout,
    known_sha256: Mapping[Path, str],
) -> tuple[list[_ImageJob], StageResult]:
    """Jobs for the used images under `roots` (the source folder first, whose files the label
    rules' CSVs live in; then the folder of unpacked patch arrays), and a result holding the
    skipped files and the failures known before decoding (entries the walk refused, images a
    rule cannot label or split)."""
    stratified = isinstance(entry.splits, StratifiedSplit)
    annotator = Annotator(
        labels=entry.labels, splits=None if stratified else entry.splits, source_dir=roots[0]
    )
    tables = {
        posixpath.normpath(table)
        for rule in (entry.labels, entry.splits)
        if isinstance(rule, CsvRule | ListedRule)
        for table in rule.tables
    }
    planned = StageResult()
    by_scale: dict[str, dict[str, Path]] = defaultdict(dict)
    for root in roots:
        selection = find_roi_images(root, tables if root == roots[0] else ())
        _add_by_scale(entry, selection, root, by_scale)
        prefix = layout.stored(root)
        planned.failures += selection.refused_rows(prefix, STAGE)
        planned.skipped += selection.skipped_rows(prefix)
    planned.skipped.sort(key=lambda row: row["file"])
    jobs = []
    for scale, sources in by_scale.items():
        output_dir = layout.image_dir(scale, entry.key)
        output_prefix = layout.relative(output_dir)
        stems = output_stems(sources)
        for relative, root in sources.items():
            source_file = f"{layout.stored(root)}/{relative}"
            try:
                annotation = annotator.annotate(relative)
            except AnnotationError as exc:
                planned.failures.append(failure(source_file, STAGE, str(exc)))
                continue
            jobs.append(
                _ImageJob(
                    source=root / relative,
                    relative=relative,
                    source_file=source_file,
                    output=output_dir / f"{stems[relative]}.jpg",
                    path=f"{output_prefix}/{stems[relative]}.jpg",
                    image_name=stems[relative],
                    scale=scale,
                    label=annotation.label,
                    split=annotation.split,
                    known_sha256=known_sha256.get(root / relative),
                )
            )
    if stratified:
        splits = stratified_split(
            ((job.relative, job.label) for job in jobs),
            ratios=entry.splits.ratios,
            seed=entry.splits.seed,
        )
    elif entry.labelled:
        splits = carve_validation((job.relative, job.label, job.split) for job in jobs)
    else:
        return jobs, planned
    return [replace(job, split=splits[job.relative]) for job in jobs], planned


def _add_by_scale(
    entry: SubDataset, selection: RawSelection, root: Path, by_scale: dict[str, dict[str, Path]]
) -> None:
    """Group the used images of `root` by their catalog scale (relative POSIX path -> root; the
    first root wins a path found in two); images the catalog gives no scale are added to the
    selection's skipped files."""
    for path in selection.used:
        relative = path.relative_to(root).as_posix()
        scale = entry.scale_for(relative)
        if scale is None:
            selection.skipped.append((relative, "the catalog's scale rules give it no scale"))
        else:
            by_scale[scale].setdefault(relative, root)


def _remove_stale_outputs(folders: Iterable[Path], kept: set[Path]) -> None:
    """Delete JPEGs not in `kept` and leftover temporaries; drop folders left empty."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.suffix == ".jpg" and entry not in kept:
                entry.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


@dataclass(frozen=True)
class _ImageJob:
    source: Path
    relative: str  # below its source root, as the catalog's rules see it
    source_file: str  # as stored in records
    output: Path
    path: str  # output as stored in records
    image_name: str
    scale: str
    label: str | None
    split: str
    known_sha256: str | None = None  # the source's digest, when already known


@dataclass(frozen=True)
class _Chunk:
    jobs: tuple[_ImageJob, ...]
    subdataset: str
    settings: RoiSettings
    crop_fraction: float


@dataclass(frozen=True)
class _Stamp:
    """What an output JPEG records about itself in its comment, so reruns need not decode."""

    source_sha256: str
    settings: str
    upscaled: bool
    mean_r: float
    mean_g: float
    mean_b: float
    saturation: float
    phash: int

    @classmethod
    def read(cls, path: Path) -> _Stamp | None:
        """The stamp of an existing output, or None (missing, unreadable or not ours)."""
        try:
            with Image.open(path) as image:
                return cls(**json.loads(image.info["comment"]))
        except (OSError, KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class _Outcome:
    record: dict[str, Any] | None = None
    failure: dict[str, str] | None = None
    reused: bool = False


def _standardize_chunk(chunk: _Chunk) -> list[_Outcome]:
    """Worker: standardize one chunk of images (module-level so executors can pickle it)."""
    fingerprint = chunk.settings.fingerprint(chunk.crop_fraction)
    outcomes = []
    for job in chunk.jobs:
        try:
            source_sha256 = job.known_sha256 or sha256_file(job.source)
        except OSError as exc:
            reason = f"{job.source_file}: cannot read source: {exc}"
            outcomes.append(_Outcome(failure=failure(job.source_file, STAGE, reason)))
            continue
        stamp = _Stamp.read(job.output)
        reused = stamp is not None and (stamp.source_sha256, stamp.settings) == (
            source_sha256,
            fingerprint,
        )
        if not reused:
            try:
                stamp = _encode(job, chunk, source_sha256=source_sha256, fingerprint=fingerprint)
            except RoiImageError as exc:
                outcomes.append(_Outcome(failure=failure(job.source_file, STAGE, str(exc))))
                continue
        outcomes.append(_Outcome(record=_record(job, chunk, stamp), reused=reused))
    return outcomes


def _lost_chunk(chunk: _Chunk, cause: str) -> list[_Outcome]:
    """Failures for the images of a chunk whose worker process died twice
    (`parallel.map_unordered`): which image killed it is unknown, so all are named."""
    reason = f"{cause} (while standardizing a chunk of {len(chunk.jobs)} images)"
    return [
        _Outcome(failure=failure(job.source_file, STAGE, f"{job.source_file}: {reason}"))
        for job in chunk.jobs
    ]


def _encode(job: _ImageJob, chunk: _Chunk, *, source_sha256: str, fingerprint: str) -> _Stamp:
    """Decode, standardize and save one image; its stamp goes into the JPEG comment."""
    square, upscaled = load_square(
        job.source,
        size=chunk.settings.size,
        crop_fraction=chunk.crop_fraction,
        max_pixels=chunk.settings.max_pixels,
    )
    pixels = np.asarray(square, dtype=np.float32)
    saturation = np.asarray(square.convert("HSV"), dtype=np.float32)[..., 1]
    stamp = _Stamp(
        source_sha256=source_sha256,
        settings=fingerprint,
        upscaled=upscaled,
        mean_r=round(float(pixels[..., 0].mean()), 3),
        mean_g=round(float(pixels[..., 1].mean()), 3),
        mean_b=round(float(pixels[..., 2].mean()), 3),
        saturation=round(float(saturation.mean()) / 255, 5),
        phash=phash(square),
    )
    with atomic_path(job.output) as tmp:
        square.save(
            tmp,
            format="JPEG",
            quality=chunk.settings.jpeg_quality,
            comment=json.dumps(asdict(stamp)),
        )
    return stamp


def _record(job: _ImageJob, chunk: _Chunk, stamp: _Stamp) -> dict[str, Any]:
    """One TILES row (schema.TILES) for a saved image."""
    return {
        "image_name": job.image_name,
        "subdataset": chunk.subdataset,
        "kind": "roi",
        "scale": job.scale,
        "size_px": chunk.settings.size,
        "x": None,
        "y": None,
        "source_file": job.source_file,
        "source_sha256": stamp.source_sha256,
        "standardized_file": None,
        "path": job.path,
        "parent_image": None,
        "label": job.label,
        "split": job.split,
        "bytes": job.output.stat().st_size,
        "upscaled": stamp.upscaled,
        "mean_r": stamp.mean_r,
        "mean_g": stamp.mean_g,
        "mean_b": stamp.mean_b,
        "saturation": stamp.saturation,
        "phash": stamp.phash,
    }
