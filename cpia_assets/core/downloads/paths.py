"""Paths inside a source folder: what is ours (state, partial files) and what is safe to write."""

from __future__ import annotations

import posixpath
import re

STATE_FILE = ".cpia_download.json"
PARTIAL_DIR = ".cpia_partial"  # downloads in progress and archive staging
ARCHIVE_DIR = ".cpia_archives"  # verified archives kept with DownloadSettings.keep_archives

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


def is_hidden(rel_path: str) -> bool:
    """Names starting with '.': our bookkeeping (.cpia_*) and system clutter (.DS_Store)."""
    return any(part.startswith(".") for part in rel_path.split("/"))
