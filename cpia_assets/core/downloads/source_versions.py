"""What a sub-dataset's inputs look like without fetching them: a version that changes when its
catalog entry changes (source, label and split rules, crop, WSI options, thresholds) or, for
`local` and `manual` sources, when a file is added, removed, resized or touched.

No file is read, only listed, so every partition's version is cheap enough to take on each
automation tick; `raw_download` then hashes the bytes (its own data version) and a rerun whose
files turn out identical leaves everything downstream fresh.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cpia_assets.core.catalog.model import SubDataset
from cpia_assets.core.downloads.errors import SourceError
from cpia_assets.core.downloads.local import list_local
from cpia_assets.core.fsutil import FolderWalk, walk_visible

DISPLAY_ONLY_FIELDS = {"name", "description", "about", "published_counts"}
LISTED_SOURCES = {"local", "manual"}


def source_version(entry: SubDataset, raw_dir: Path) -> str:
    """sha256 of the entry's fields that shape outputs and of its listed files (local: the
    source folder or glob; manual: the files put under `raw_dir`)."""
    digest = hashlib.sha256()
    fields = entry.model_dump(mode="json", exclude=DISPLAY_ONLY_FIELDS)
    digest.update(json.dumps(fields, sort_keys=True).encode())
    source_type = entry.source["type"]
    if source_type in LISTED_SOURCES:
        for line in _listing(entry.source["path"] if source_type == "local" else raw_dir):
            digest.update(f"{line}\n".encode())
    return digest.hexdigest()


def _listing(where: str | Path) -> list[str]:
    """One line per file (relative path, size, mtime) or refused entry; a missing folder is
    a line of its own (the download reports it)."""
    try:
        walk = list_local(str(where)) if isinstance(where, str) else walk_visible(where)
    except (SourceError, OSError) as exc:
        return [f"unlisted: {exc}"]
    return _lines(walk)


def _lines(walk: FolderWalk) -> list[str]:
    lines = []
    for path, rel in walk.files:
        stat = path.stat()
        lines.append(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return lines + [f"refused {rel}\t{reason}" for rel, reason in walk.refused]
