"""The per-source state file (`<dest>/.cpia_download.json`): what is already here and verified.

A file is reused without hashing when its size and modification time still match the entry,
so a rerun costs neither network traffic nor a re-read of the data. The cached API listing
lets a rerun skip the API query too.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cpia_assets.core.downloads.paths import STATE_FILE
from cpia_assets.core.fsutil import atomic_path

_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    """One verified file of the source, as recorded in RAW_FILES."""

    rel_path: str
    bytes: int
    sha256: str
    source: str
    fetched_at: str  # ISO 8601, UTC
    mtime_ns: int  # of the file as stat() sees it (following a link)
    owned: bool = True  # created by us (download, link, copy): removed when the source drops it

    def is_current(self, dest: Path) -> bool:
        try:
            stat = (dest / self.rel_path).stat()
        except OSError:
            return False
        return stat.st_size == self.bytes and stat.st_mtime_ns == self.mtime_ns

    def row(self) -> dict[str, Any]:
        """The RAW_FILES record of this file."""
        return {
            "rel_path": self.rel_path,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "source": self.source,
            "fetched_at": datetime.fromisoformat(self.fetched_at),
        }


@dataclass(frozen=True)
class ArchiveEntry:
    """An archive that was verified and extracted; `members` are the files it produced."""

    sha256: str
    bytes: int
    source: str
    members: tuple[str, ...]


@dataclass
class DownloadState:
    """Loaded from and saved to the state file; safe to update from worker threads."""

    dest: Path
    files: dict[str, FileEntry] = field(default_factory=dict)
    archives: dict[str, ArchiveEntry] = field(default_factory=dict)
    listing_key: str = ""
    listing: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, dest: Path) -> DownloadState:
        path = dest / STATE_FILE
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls(dest=dest)  # missing or unreadable: files get verified again
        if not isinstance(document, dict) or document.get("version") != _VERSION:
            return cls(dest=dest)
        return cls(
            dest=dest,
            files={e["rel_path"]: FileEntry(**e) for e in document.get("files", [])},
            archives={
                rel: ArchiveEntry(**{**entry, "members": tuple(entry["members"])})
                for rel, entry in document.get("archives", {}).items()
            },
            listing_key=document.get("listing_key", ""),
            listing=list(document.get("listing", [])),
        )

    def save(self) -> None:
        with self._lock:
            document = {
                "version": _VERSION,
                "listing_key": self.listing_key,
                "listing": self.listing,
                "files": [asdict(entry) for entry in self.files.values()],
                "archives": {rel: asdict(entry) for rel, entry in self.archives.items()},
            }
            text = json.dumps(document, indent=1, sort_keys=True)
        with atomic_path(self.dest / STATE_FILE) as tmp:
            tmp.write_text(text)

    def current(self, rel_path: str, source: str) -> FileEntry | None:
        """The entry of `rel_path` if it came from `source` and is unchanged on disk."""
        entry = self.files.get(rel_path)
        if entry is not None and entry.source == source and entry.is_current(self.dest):
            return entry
        return None

    def record(self, rel_path: str, *, sha256: str, source: str, owned: bool = True) -> FileEntry:
        stat = (self.dest / rel_path).stat()
        entry = FileEntry(
            rel_path=rel_path,
            bytes=stat.st_size,
            sha256=sha256,
            source=source,
            fetched_at=datetime.now(UTC).isoformat(),
            mtime_ns=stat.st_mtime_ns,
            owned=owned,
        )
        with self._lock:
            self.files[rel_path] = entry
        return entry

    def record_archive(self, rel_path: str, entry: ArchiveEntry) -> None:
        with self._lock:
            self.archives[rel_path] = entry

    def forget_except(self, keep: Iterable[str], archives: Iterable[str] = ()) -> list[FileEntry]:
        """Drop entries not in `keep` (and archives not in `archives`); returns dropped files."""
        keep, archives = set(keep), set(archives)
        with self._lock:
            dropped = [entry for rel, entry in self.files.items() if rel not in keep]
            self.files = {rel: entry for rel, entry in self.files.items() if rel in keep}
            self.archives = {rel: a for rel, a in self.archives.items() if rel in archives}
        return dropped


def verified_digests(dest: Path) -> dict[Path, str]:
    """The sha256 of every file the state file of `dest` records and that is unchanged on disk
    (size and modification time, as a rerun of the download judges it), by path under `dest`:
    later stages need not read the bytes again to identify their inputs."""
    files = DownloadState.load(dest).files.values()
    return {dest / entry.rel_path: entry.sha256 for entry in files if entry.is_current(dest)}


def listing_key(spec: Mapping[str, Any]) -> str:
    """A digest of the spec that produced a listing; specs hold no secrets, only env names."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def remove_dropped(dest: Path, dropped: Iterable[FileEntry]) -> list[str]:
    """Delete files we created that the source no longer lists; returns their paths."""
    removed = []
    for entry in dropped:
        path = dest / entry.rel_path
        if entry.owned and (path.is_file() or path.is_symlink()):
            path.unlink()
            removed.append(entry.rel_path)
    for folder in sorted({p.parent for p in map(Path, removed)}, key=lambda p: -len(p.parts)):
        _remove_empty_dirs(dest, dest / folder)
    return removed


def _remove_empty_dirs(dest: Path, folder: Path) -> None:
    while folder != dest and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
