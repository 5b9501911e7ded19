"""raw_download: bring each sub-dataset's source files onto disk, verified, with a record per file.

Source types (the catalog's `source:` block): local, http, gdc, idc, zenodo, figshare, manual and
synthetic; see `spec.py` for each type's parameters. Nothing else in the platform reaches the
network. `tcia` is refused with a pointer to `idc`, which mirrors TCIA's slide collections.
"""

from cpia_assets.core.downloads.errors import (
    FileFetchError,
    IntegrityError,
    ListingError,
    ManualDownloadRequired,
    SourceError,
    SourceIncomplete,
    SourceSpecError,
    UnsafeArchiveError,
)
from cpia_assets.core.downloads.fetch import STAGE, fetch_source, source_data_version
from cpia_assets.core.downloads.settings import DownloadSettings
from cpia_assets.core.downloads.spec import SOURCE_TYPES, validate_source

__all__ = [
    "SOURCE_TYPES",
    "STAGE",
    "DownloadSettings",
    "FileFetchError",
    "IntegrityError",
    "ListingError",
    "ManualDownloadRequired",
    "SourceError",
    "SourceIncomplete",
    "SourceSpecError",
    "UnsafeArchiveError",
    "fetch_source",
    "source_data_version",
    "validate_source",
]
