"""How downloads behave: concurrency, timeouts, retries, limits."""

from __future__ import annotations

from dataclasses import dataclass

from cpia_assets.core.catalog.sources import LOCAL_MODES

GIB = 1 << 30


@dataclass(frozen=True)
class DownloadSettings:
    """Knobs of `fetch_source`; the defaults suit public repositories over the internet.

    `concurrency` is the number of files fetched at once within one partition (threads); how
    many partitions download at once is bounded by the Dagster pool of the asset.
    """

    concurrency: int = 4
    timeout_s: float = 60.0  # connect and per-read socket timeout
    retries: int = 5  # consecutive failed attempts (no new bytes) before a file fails
    backoff_s: float = 2.0  # first wait; doubles per attempt up to max_backoff_s
    max_backoff_s: float = 60.0
    max_extracted_bytes: int = 256 * GIB  # per archive: larger expansions are rejected
    local_mode: str = "symlink"  # how `local` sources are brought in (a spec may override)
    chunk_bytes: int = 1 << 20
    keep_archives: bool = False  # keep verified archives (in .cpia_archives/) after extracting
    refresh_listings: bool = False  # ask the API again even when a cached listing exists
    page_size: int = 500  # rows per API listing request
    user_agent: str = "cpia-assets raw_download"

    def __post_init__(self) -> None:
        if self.local_mode not in LOCAL_MODES:
            raise ValueError(f"local_mode {self.local_mode!r} is not one of {LOCAL_MODES}")
        for name in ("concurrency", "chunk_bytes", "max_extracted_bytes", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DownloadSettings.{name} must be at least 1")
        if self.retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("DownloadSettings: retries >= 0, timeout_s > 0, backoff_s >= 0")
