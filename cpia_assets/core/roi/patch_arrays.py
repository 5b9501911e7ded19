"""HDF5 patch arrays (PatchCamelyon): every patch becomes a PNG that the ROI stage reads.

PCam ships `camelyonpatch_level_2_split_<split>_x.h5.gz` (dataset `x`: N x 96 x 96 x 3 uint8)
beside `..._y.h5.gz` (dataset `y`: N labels, shaped N x 1 x 1 x 1). A source file `<stem>.h5`,
`.hdf5` or `.h5.gz` (gzip is decompressed to a temporary file first, since HDF5 needs random
access) holding an image array (N x H x W [x 1|3], uint8) is unpacked into
`unpacked/<key>/<relative folder>/<stem>/<index>.png` (index zero-padded, in array order). When
a label file sits beside it, named like the image file with its final `_x` replaced by `_y`,
each patch goes into a folder named after its label instead: `<stem>/<label>/<index>.png`, so a
catalog label rule `{from: parent_folder}` reads it. Such label files are not unpacked on their
own; any other HDF5 file without exactly one image array is a failure.

Unpacking is atomic per file (a staging folder renamed into place) and resumable: a marker
`<stem>.json` records the sizes and modification times of the files it was made from, and a
rerun skips files whose marker matches. Unpacked folders whose source is gone, or now fails,
are removed. A file that cannot be read becomes a failure naming it; the other files are still
unpacked.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from cpia_assets.core.fsutil import atomic_path
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.stage import failure

SUFFIXES = (".h5.gz", ".hdf5", ".h5")
_BATCH = 1024
"""Patches read from the array at once (96 px RGB: 28 MiB)."""
_VERSION = 1


class PatchArrayError(ValueError):
    """An HDF5 file that cannot be unpacked; the message names the file and the reason."""


@dataclass(frozen=True)
class _UnpackJob:
    source: Path
    labels: Path | None
    target: Path  # the folder the PNGs go into
    stored_name: str  # the source as records name it


def array_stem(path: Path) -> str | None:
    """The file name without its HDF5 suffix, or None when `path` is not an HDF5 file."""
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def unpack_patch_arrays(
    source_dir: Path,
    unpacked_dir: Path,
    *,
    stage: str,
    stored_prefix: str,
    executor: Executor | None = None,
) -> list[dict[str, str]]:
    """Unpack every HDF5 patch array under `source_dir` into `unpacked_dir` (module docstring).

    Returns a failure row (`stage`, file named `<stored_prefix>/<relative path>`) per file that
    could not be unpacked."""
    jobs = _jobs(Path(source_dir), Path(unpacked_dir), stored_prefix)
    _remove_orphans(Path(unpacked_dir), {job.target for job in jobs})
    failures = []
    for job, error in map_unordered(_unpack_or_reuse, jobs, executor):
        if error is not None:
            failures.append(failure(job.stored_name, stage, f"{job.stored_name}: {error}"))
    return sorted(failures, key=lambda row: row["file"])


def _jobs(source_dir: Path, unpacked_dir: Path, stored_prefix: str) -> list[_UnpackJob]:
    if not source_dir.is_dir():
        return []
    arrays = {
        path: stem
        for path in sorted(source_dir.rglob("*"))
        if (stem := array_stem(path)) and path.is_file() and not _hidden(path, source_dir)
    }
    by_stem = {(path.parent, stem): path for path, stem in arrays.items()}
    label_files = {
        path: by_stem.get((path.parent, stem[:-2] + "_y")) if stem.endswith("_x") else None
        for path, stem in arrays.items()
    }
    jobs = []
    for path, stem in arrays.items():
        if path in label_files.values():
            continue
        labels = label_files[path]
        relative = path.relative_to(source_dir)
        jobs.append(
            _UnpackJob(
                source=path,
                labels=labels,
                target=unpacked_dir / relative.parent / stem,
                stored_name=f"{stored_prefix}/{relative.as_posix()}",
            )
        )
    return jobs


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _unpack_or_reuse(job: _UnpackJob) -> tuple[_UnpackJob, str | None]:
    """Worker: unpack one file unless its marker matches; returns the job and an error text."""
    marker = job.target.with_name(job.target.name + ".json")
    try:
        fingerprint = _fingerprint(job)
        if _marker_matches(marker, fingerprint) and job.target.is_dir():
            return job, None
        _unpack(job)
    except (PatchArrayError, OSError, EOFError) as exc:  # gzip errors are OSErrors
        shutil.rmtree(job.target, ignore_errors=True)  # earlier patches must not stand in
        marker.unlink(missing_ok=True)
        reason = str(exc) if isinstance(exc, PatchArrayError) else f"cannot read: {exc!r}"
        return job, reason
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(fingerprint))
    return job, None


def _marker_matches(marker: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        return json.loads(marker.read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def _fingerprint(job: _UnpackJob) -> dict[str, Any]:
    files = [job.source] + ([job.labels] if job.labels else [])
    stats = [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    return {"version": _VERSION, "files": stats}


def _unpack(job: _UnpackJob) -> None:
    scratch = job.target.parent
    with _readable(job.source, scratch) as images_file:
        images = _image_array(images_file)
        labels = _labels(job.labels, len(images), scratch) if job.labels else None
        with atomic_path(job.target) as staging:
            staging.mkdir()
            digits = len(str(max(len(images) - 1, 0)))
            for start in range(0, len(images), _BATCH):
                for offset, patch in enumerate(images[start : start + _BATCH]):
                    index = start + offset
                    folder = staging / labels[index] if labels else staging
                    folder.mkdir(exist_ok=True)
                    pixels = patch[..., 0] if patch.ndim == 3 and patch.shape[2] == 1 else patch
                    Image.fromarray(pixels).save(
                        folder / f"{index:0{digits}d}.png", compress_level=1
                    )


def _image_array(handle: h5py.File) -> h5py.Dataset:
    """The file's one image array: uint8, N x H x W or N x H x W x 1|3, with H, W > 1."""
    found = [
        dataset
        for dataset in _datasets(handle)
        if dataset.dtype == np.uint8
        and dataset.ndim in (3, 4)
        and dataset.shape[1] > 1
        and dataset.shape[2] > 1
        and (dataset.ndim == 3 or dataset.shape[3] in (1, 3))
    ]
    if len(found) != 1:
        names = [dataset.name for dataset in _datasets(handle)]
        raise PatchArrayError(
            f"expected one uint8 image array (N x H x W [x 1|3]), found {len(found)} "
            f"among datasets {names}"
        )
    return found[0]


def _labels(path: Path, count: int, scratch: Path) -> list[str]:
    """One label per patch from the label file's single dataset (integers printed plainly)."""
    with _readable(path, scratch) as handle:
        datasets = _datasets(handle)
        if len(datasets) != 1:
            raise PatchArrayError(f"label file {path.name}: expected one dataset, found "
                                  f"{[d.name for d in datasets]}")  # fmt: skip
        values = np.asarray(datasets[0][()]).reshape(len(datasets[0]), -1)
    if values.shape != (count, 1):
        raise PatchArrayError(
            f"label file {path.name} holds {values.shape[0]} x {values.shape[1]} values "
            f"for {count} patches (expected one per patch)"
        )
    return [_label_text(value) for value in values[:, 0]]


def _label_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _datasets(handle: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    handle.visititems(
        lambda _, item: found.append(item) if isinstance(item, h5py.Dataset) else None
    )
    return found


@contextmanager
def _readable(path: Path, scratch: Path) -> Iterator[h5py.File]:
    """The HDF5 file opened read-only. A gzip file is first decompressed into a hidden scratch
    folder under `scratch` (never beside the source, which may be a user's read-only folder)."""
    if not path.name.lower().endswith(".gz"):
        with _open_hdf5(path) as handle:
            yield handle
        return
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gunzip-", dir=scratch) as folder:
        plain = Path(folder) / path.name[: -len(".gz")]
        with gzip.open(path, "rb") as compressed, plain.open("wb") as out:
            shutil.copyfileobj(compressed, out, 1 << 20)
        with _open_hdf5(plain) as handle:
            yield handle


@contextmanager
def _open_hdf5(path: Path) -> Iterator[h5py.File]:
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise PatchArrayError(f"not a readable HDF5 file: {exc}") from exc
    with handle:
        yield handle


def _remove_orphans(unpacked_dir: Path, keep: set[Path]) -> None:
    """Delete unpacked folders (and markers) whose source file is no longer there."""
    if not unpacked_dir.is_dir():
        return
    for marker in unpacked_dir.rglob("*.json"):
        folder = marker.with_suffix("")
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            marker.unlink(missing_ok=True)
