"""Small file-system helpers: hashing, atomic writes (so nothing half-written is ever seen) and
the walk of a source folder that every stage shares."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed onto `final` in one step.

    Works for files and folders. On error the temporary path is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        target.replace(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
