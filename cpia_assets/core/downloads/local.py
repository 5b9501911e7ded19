"""`local` sources: files the user already has, linked or copied into the source folder."""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from cpia_assets.core.downloads.errors import FileFetchError, SourceError
from cpia_assets.core.downloads.state import DownloadState, FileEntry
from cpia_assets.core.fsutil import FolderWalk, atomic_path, sha256_file, walk_visible

_GLOB_CHARS = frozenset("*?[")


def list_local(pattern: str) -> FolderWalk:
    """The files of a folder or a glob, with paths relative to the folder or the glob's fixed
    part, and the entries refused (`fsutil.walk_visible`; for a glob, those it matches).

    Hidden files and folders (a name starting with '.') are left out; links to folders are
    followed, also by `**` (unlike `Path.glob` before Python 3.13).
    """
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    base = Path(*parts[:fixed])
    if not base.is_dir():
        raise SourceError(f"local source {pattern}: no such folder")
    listing = walk_visible(base)
    if fixed < len(parts):
        wanted = parts[fixed:]
        listing = FolderWalk(
            files=[(path, rel) for path, rel in listing.files if _matches(rel, wanted)],
            refused=[(rel, reason) for rel, reason in listing.refused if _matches(rel, wanted)],
        )
    if not listing.files and not listing.refused:
        raise SourceError(f"local source {pattern}: no files found")
    return listing


def _matches(rel_path: str, pattern: Sequence[str]) -> bool:
    """Whether a relative path matches glob pattern parts (`**`: any number of folders)."""
    parts = rel_path.split("/")

    def match(i: int, j: int) -> bool:
        if j == len(pattern):
            return i == len(parts)
        if pattern[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(parts) + 1))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pattern[j]) and match(i + 1, j + 1)

    return match(0, 0)


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
