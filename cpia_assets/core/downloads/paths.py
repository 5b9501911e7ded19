"""Paths inside a source folder: what is ours (state, partial files) and what is safe to write."""

from __future__ import annotations

STATE_FILE = ".cpia_download.json"
PARTIAL_DIR = ".cpia_partial"  # downloads in progress and archive staging
ARCHIVE_DIR = ".cpia_archives"  # verified archives kept with DownloadSettings.keep_archives


def is_hidden(rel_path: str) -> bool:
    """Names starting with '.': our bookkeeping (.cpia_*) and system clutter (.DS_Store)."""
    return any(part.startswith(".") for part in rel_path.split("/"))
