"""Small file-system helpers: hashing, atomic writes (so nothing half-written is ever seen),
the walk of a source folder that every stage shares, and telling a fault of the output side
(disk full, quota, read-only or failing disk) from a fault of the input.

A full disk is not a bad slide: stages record per-item failures only for faults of the item
and re-raise `OutputWriteError`, which fails the whole step with the path and the reason.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

_CHUNK = 1 << 20

OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})
"""Errors of the device written to. EIO counts only when the error says it was a write."""
_ALWAYS_OUTPUT_ERRNOS = OUTPUT_ERRNOS - {errno.EIO}
_STRERRORS = frozenset(os.strerror(code) for code in OUTPUT_ERRNOS)
# How libraries that do not raise OSError report a failed write: libvips ("<file>: write error
# system error: No space left on device"), DuckDB ('Could not write file "<file>": No space left
# on device'), Polars ("underlying IO error: No space left on device (os error 28)").
_WRITE_FAILED = re.compile(
    r'(?:write error\s*system error: |Could not write file "[^"]*": |IO error: )(?P<reason>[^\n(]+)'
)


class OutputWriteError(Exception):
    """Writing an output failed on the output side (e.g. the disk is full): no input is at
    fault, so a stage fails instead of recording a per-item failure."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = str(path), reason
        disk_full = reason == os.strerror(errno.ENOSPC)
        what = "disk full" if disk_full else "output device error"
        super().__init__(f"{what}: cannot write {self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses process pools intact
        return type(self), (self.path, self.reason)


class OutputLostError(OutputWriteError):
    """A temporary output vanished while it was written or before it was renamed into place:
    an internal error (another process removed it, or a bug), never a fault of the input, so a
    stage fails instead of recording a per-item failure."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = str(path), reason
        Exception.__init__(self, f"internal error while writing {self.path}: {reason}")


def output_fault(exc: BaseException, path: Path | str) -> OutputWriteError | None:
    """`exc`, raised while writing `path`, as an `OutputWriteError` when the output side is at
    fault (one of `OUTPUT_ERRNOS`), else None (a fault of the input, or a bug)."""
    if isinstance(exc, OutputWriteError):
        return exc
    if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
        writes = exc.errno in _ALWAYS_OUTPUT_ERRNOS or _names(exc.filename, path)
        return OutputWriteError(path, os.strerror(exc.errno)) if writes else None
    text = "\n".join(str(part) for part in (exc, getattr(exc, "detail", "")))
    for match in _WRITE_FAILED.finditer(text):
        reason = match["reason"].strip()
        if reason in _STRERRORS:
            return OutputWriteError(path, reason)
    return None


def _names(filename: object, path: Path | str) -> bool:
    """Whether an error's `filename` is `path` or lies inside its folder (its temporaries)."""
    if not filename:
        return False
    folder = Path(path).parent
    return Path(str(filename)) == Path(path) or folder in Path(str(filename)).parents


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Re-raise an output-side fault inside the block as `OutputWriteError` (see
    `output_fault`); any other error passes unchanged."""
    try:
        yield
    except Exception as exc:
        fault = output_fault(exc, path)
        if fault is None or fault is exc:
            raise
        raise fault from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed onto `final` in one step.

    Works for files and folders. On error the temporary path is removed and `final` is
    untouched; an output-side fault (disk full ...) is raised as `OutputWriteError` naming
    `final`, and any error once the temporary folder has vanished (whatever the writer made of
    it, e.g. a libvips write error) or a rename that finds no temporary as `OutputLostError`.
    """
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        target = tmp / final.name
        try:
            try:
                yield target
            except Exception as exc:
                if not tmp.is_dir():
                    raise _lost(final, tmp, "while it was written", exc) from exc
                raise
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            try:
                target.replace(final)
            except FileNotFoundError as exc:
                raise _lost(final, target, "before it was renamed into place", exc) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _lost(final: Path, tmp: Path, when: str, exc: BaseException) -> OutputLostError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OutputLostError(
        final, f"the temporary {tmp} vanished {when} (removed by another process?): {first}"
    )


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)
    return path


def printable_path(path: str) -> str:
    """`path` as valid UTF-8 text: bytes that are not UTF-8 appear escaped (`caf\\xff.png`)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class FolderWalk:
    """What `walk_visible` found: files it can hand on, and entries it refuses, with reasons."""

    files: list[tuple[Path, str]] = field(default_factory=list)
    """(path, POSIX path relative to the walked folder), sorted by the relative path."""
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(relative path, escaped by `printable_path`; why it cannot be used)."""


def walk_visible(root: Path) -> FolderWalk:
    """Every visible file below `root`, following links to folders.

    Names starting with '.' (our bookkeeping, system clutter) are left out. Nothing else is
    dropped silently: a name that is not valid UTF-8 (manifests store UTF-8), a link that
    loops back to a folder above it, a broken link, a folder that cannot be listed and anything
    that is not a regular file are refused with the reason.
    """
    walk = FolderWalk()
    _walk_folder(Path(root), "", frozenset(), walk)
    walk.files.sort(key=lambda item: item[1])
    walk.refused.sort()
    return walk


def _walk_folder(
    folder: Path, prefix: str, ancestors: frozenset[tuple[int, int]], walk: FolderWalk
) -> None:
    try:
        here = folder.stat()
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as exc:
        walk.refused.append((printable_path(prefix or "."), f"cannot list the folder: {exc}"))
        return
    ancestors |= {(here.st_dev, here.st_ino)}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        relative = prefix + entry.name
        if printable_path(entry.name) != entry.name:
            walk.refused.append(
                (printable_path(relative), "the name is not valid UTF-8; rename it")
            )
        elif entry.is_dir():
            target = entry.stat()
            if (target.st_dev, target.st_ino) in ancestors:
                walk.refused.append((relative, "loops back to a folder above it; not followed"))
            else:
                _walk_folder(Path(entry.path), relative + "/", ancestors, walk)
        elif entry.is_file():
            walk.files.append((Path(entry.path), relative))
        elif entry.is_symlink():
            walk.refused.append((relative, f"broken link to {Path(entry.path).readlink()}"))
        else:
            walk.refused.append((relative, "not a regular file or folder"))


_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafePathError(ValueError):
    """A relative path that is absolute, climbs out with '..', or is empty."""


def safe_relative(name: str) -> str:
    """`name` as a clean POSIX path below its folder; raises UnsafePathError otherwise.

    Backslashes count as separators (archives made on Windows), so `..\\x` is caught too.
    """
    text = name.replace("\\", "/")
    if "\x00" in text:
        raise UnsafePathError(f"path {name!r} contains a NUL byte")
    if text.startswith("/") or _DRIVE.match(text):
        raise UnsafePathError(f"path {name!r} is absolute")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"path {name!r} climbs out of its folder with '..'")
    if not parts:
        raise UnsafePathError(f"path {name!r} is empty")
    return posixpath.join(*parts)
