"""Errors of `raw_download`: every message names the source or file and the reason."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class SourceError(Exception):
    """A source whose files could not all be brought in."""


class ManualDownloadRequired(SourceError):
    """The source needs a person (licence click-through, registration); its folder is empty."""

    def __init__(self, *, name: str, landing_page: str, instructions: str, dest: str) -> None:
        self.landing_page = landing_page
        self.dest = dest
        steps = f" ({instructions.rstrip('.')})" if instructions else ""
        super().__init__(
            f"{name} must be downloaded by hand: get it from {landing_page}{steps}, put its "
            f"files in {dest}, then run raw_download again"
        )


class ListingError(SourceError):
    """The source's index (an API's file list) could not be read."""


class FileFetchError(SourceError):
    """One file of a source could not be brought in; its siblings are unaffected."""

    def __init__(self, rel_path: str, reason: str) -> None:
        self.rel_path = rel_path
        self.reason = reason
        super().__init__(f"{rel_path}: {reason}")


class IntegrityError(FileFetchError):
    """A downloaded file whose size or checksum differs from the published one."""


class UnsafeArchiveError(FileFetchError):
    """An archive that would write outside its folder, holds devices, or expands too much."""


class SourceIncomplete(SourceError):
    """Some files failed; `rows` holds the good ones (kept on disk for the rerun)."""

    def __init__(
        self, source: str, failures: Sequence[Mapping[str, str]], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        self.failures = list(failures)
        self.rows = list(rows)
        listed = "\n".join(f"  - {f['file']}: {f['reason']}" for f in self.failures)
        super().__init__(
            f"{source}: {len(self.failures)} of {len(self.failures) + len(self.rows)} files "
            f"failed (the {len(self.rows)} good ones are kept for the rerun):\n{listed}"
        )
