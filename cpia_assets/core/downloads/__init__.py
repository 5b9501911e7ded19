"""Stage 1, raw_download: takes a catalog entry's `source:` block and gives its files under
`raw/<key>/`, verified, with a record per file; `source_versions` tells what a source holds
without fetching it (the automation's observation).

Source types: local, http, gdc, idc, zenodo, figshare, manual and synthetic; see
`core/catalog/sources.py` for each type's parameters. Nothing else in the platform reaches the
network. `tcia` is refused with a pointer to `idc`, which mirrors TCIA's slide collections.
"""

from cpia_assets.core.downloads.errors import (
    FileFetchError,
    IntegrityError,
    ListingError,
    ManualDownloadRequired,
    SourceError,
    SourceIncomplete,
    UnsafeArchiveError,
)
from cpia_assets.core.downloads.fetch import STAGE, fetch_source, source_data_version
from cpia_assets.core.downloads.settings import DownloadSettings

__all__ = [
    "STAGE",
    "DownloadSettings",
    "FileFetchError",
    "IntegrityError",
    "ListingError",
    "ManualDownloadRequired",
    "SourceError",
    "SourceIncomplete",
    "UnsafeArchiveError",
    "fetch_source",
    "source_data_version",
]
