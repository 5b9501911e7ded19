"""`local` sources: files the user already has, linked or copied into the source folder."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from cpia_assets.core.downloads.errors import FileFetchError, SourceError
from cpia_assets.core.downloads.paths import is_hidden
from cpia_assets.core.downloads.state import DownloadState, FileEntry
from cpia_assets.core.fsutil import (
    FolderWalk,
    atomic_path,
    printable_path,
    sha256_file,
    walk_visible,
)

_GLOB_CHARS = frozenset("*?[")


def list_local(pattern: str) -> FolderWalk:
    """The files of a folder or a glob, with paths relative to the folder or the glob's fixed
    part, and the entries refused (`fsutil.walk_visible`).

    Hidden files and folders (a name starting with '.') are left out; links to folders are
    followed.
    """
    if not _GLOB_CHARS & set(pattern):
        if not Path(pattern).is_dir():
            raise SourceError(f"local source {pattern}: no such folder")
        listing = walk_visible(Path(pattern))
    else:
        parts = Path(pattern).parts
        fixed = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
        base = Path(*parts[:fixed])
        listing = FolderWalk()
        for path in sorted(base.glob(Path(*parts[fixed:]).as_posix())):
            rel = path.relative_to(base).as_posix()
            if is_hidden(rel) or not path.is_file():
                continue
            if printable_path(rel) != rel:
                listing.refused.append((printable_path(rel), "the name is not valid UTF-8"))
            else:
                listing.files.append((path, rel))
    if not listing.files and not listing.refused:
        raise SourceError(f"local source {pattern}: no files found")
    return listing


def bring_local(
    origin: Path, rel_path: str, *, dest: Path, state: DownloadState, mode: str
) -> FileEntry:
    """Link or copy one file unless an unchanged earlier copy (or link) is in place."""
    target = dest / rel_path
    source = str(origin.resolve())
    entry = state.current(rel_path, source)
    if entry is not None and _unchanged(origin, entry) and _same_link(target, source, mode):
        return entry
    sha256 = sha256_file(origin)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if mode == "symlink":
        target.symlink_to(source)
    elif mode == "hardlink":
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise FileFetchError(
                    rel_path, f"cannot hard-link {source} across file systems; use mode copy"
                ) from exc
            raise
    else:
        with atomic_path(target) as tmp:
            shutil.copy2(source, tmp)
    return state.record(rel_path, sha256=sha256, source=source)


def _unchanged(origin: Path, entry: FileEntry) -> bool:
    stat = origin.stat()
    return stat.st_size == entry.bytes and stat.st_mtime_ns == entry.mtime_ns


def _same_link(target: Path, source: str, mode: str) -> bool:
    if mode == "symlink":
        return target.is_symlink() and str(target.readlink()) == source
    return not target.is_symlink()
