"""The validated entries of a catalog file kept as JSON for the next process: parsing a
10,000-entry file with PyYAML takes seconds, reading the JSON back through the same validation a
fraction of that."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from cpia_assets.core.catalog import fields, model, rules, sources, validation
from cpia_assets.core.catalog.model import SubDataset
from cpia_assets.core.fsutil import OutputWriteError, atomic_path

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileVersion:
    """One version of a catalog file: a changed file has another size or modification time."""

    path: Path
    size: int
    mtime_ns: int


_ENTRIES = TypeAdapter(list[SubDataset])


@lru_cache(maxsize=1)
def _code_version() -> str:
    """A hash of the code that decides what a valid entry is: a new version of it never reads
    a cache written by an older one."""
    digest = hashlib.sha256()
    for module in (fields, rules, model, sources, validation):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CatalogCache:
    """The validated entries of one catalog file version, as JSON in `folder`.

    The file is named after the catalog's path and records the version it was made from (size,
    modification time, code version); a cache of another version, or one that cannot be read, is
    ignored. Entries read back go through the same validation as the YAML's, so a damaged cache
    can never yield an invalid entry; only local paths are resolved after (`_with_local_paths`).
    """

    folder: Path
    version: FileVersion

    @property
    def file(self) -> Path:
        name = hashlib.sha256(str(self.version.path).encode()).hexdigest()[:32]
        return self.folder / f"{name}.json"

    @property
    def stamp(self) -> dict[str, Any]:
        return {
            "path": str(self.version.path),
            "size": self.version.size,
            "mtime_ns": self.version.mtime_ns,
            "code": _code_version(),
        }

    def read(self) -> list[SubDataset] | None:
        try:
            stamp, entries = self.file.read_bytes().split(b"\n", 1)
            if json.loads(stamp) != self.stamp:
                return None
            return _ENTRIES.validate_json(entries)
        except (OSError, ValueError):  # missing, unreadable, or damaged (ValidationError too)
            return None

    def write(self, entries: list[SubDataset]) -> None:
        """Store `entries` atomically; entries JSON cannot represent exactly (YAML dates,
        infinities) are not cached, and a cache that cannot be written only costs speed."""
        data = _ENTRIES.dump_json(entries, by_alias=True, exclude_unset=True)
        try:
            if _ENTRIES.validate_json(data) != entries:
                return
        except ValidationError:
            return
        try:
            with atomic_path(self.file) as tmp:
                tmp.write_bytes(json.dumps(self.stamp).encode() + b"\n" + data)
        except (OSError, OutputWriteError) as exc:
            _log.warning("catalog cache %s not written: %s", self.file, exc)
