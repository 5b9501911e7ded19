"""raw_download: a sub-dataset's source files on disk, verified, with a per-file record."""

from __future__ import annotations

import hashlib

import dagster as dg

from cpia_assets.core import schema
from cpia_assets.core.downloads import DownloadSettings, fetch_source
from cpia_assets.defs.records import config_class, progress_logger, settings_from, write_records
from cpia_assets.defs.resources import CpiaStore

DownloadConfig = config_class(DownloadSettings, "DownloadConfig")


def build_raw_download(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        partitions_def=partitions,
        pool="downloads",
        group_name="ingest",
        code_version="1",
        kinds={"python", "file"},
        description=(
            "Source files of one sub-dataset under raw/<key>/, fetched per the catalog's source "
            "spec (local, http, gdc, idc/tcia, zenodo, figshare, manual, synthetic), verified by "
            "checksum and size. A rerun fetches nothing already complete. The data version is a "
            "hash of the file records, so downstream partitions go stale only on real changes."
        ),
    )
    def raw_download(
        context: dg.AssetExecutionContext, config: DownloadConfig, store: CpiaStore
    ) -> dg.MaterializeResult:
        key = context.partition_key
        entry = store.entry(key)
        layout = store.layout
        rows = fetch_source(
            entry.source,
            layout.raw_dir(key),
            settings=settings_from(config, DownloadSettings),
            progress=progress_logger(context),
        )
        write_records(context, layout, "raw_files", rows, schema.RAW_FILES)
        fingerprint = hashlib.sha256()
        for row in sorted(rows, key=lambda r: r["rel_path"]):
            fingerprint.update(f"{row['rel_path']}\0{row['sha256']}\n".encode())
        return dg.MaterializeResult(
            metadata={
                "files": len(rows),
                "bytes": sum(int(r["bytes"]) for r in rows),
                "folder": dg.MetadataValue.path(str(layout.raw_dir(key))),
                "source_type": entry.source["type"],
            },
            data_version=dg.DataVersion(fingerprint.hexdigest()[:16]),
        )

    return raw_download
