"""source_files (an observed view of each sub-dataset's catalog entry and local files) and
raw_download: a sub-dataset's source files on disk, verified, with a per-file record."""

import warnings

import dagster as dg

from cpia_assets.core import schema
from cpia_assets.core.catalog.model import UNKNOWN, SubDataset
from cpia_assets.core.downloads import (
    DownloadSettings,
    SourceIncomplete,
    fetch_source,
    source_data_version,
)
from cpia_assets.core.downloads.source_versions import source_version
from cpia_assets.defs.automation import observe_sources
from cpia_assets.defs.instance import DOWNLOADS_POOL
from cpia_assets.defs.locks import PartitionLocks
from cpia_assets.defs.records import (
    config_class,
    failures_markdown,
    progress_logger,
    settings_from,
    write_failures,
    write_records,
)
from cpia_assets.defs.resources import CpiaStore

DownloadConfig = config_class(DownloadSettings, "DownloadConfig")
SOURCE_ASSET = "source_files"


def about_metadata(entry: SubDataset) -> dict[str, str | dg.MetadataValue]:
    """The entry's organ, Table I row and `about` facts, shown with each partition in the UI."""
    about = entry.about
    landing = about.landing_page
    return {
        "organ": entry.organ,
        "table_i_row": entry.table_i_organ,
        "licence": about.licence,
        "redistributable": {True: "yes", False: "no"}.get(about.redistributable, "unknown"),
        "stain": about.stain,
        "diseases": "; ".join(about.diseases) or UNKNOWN,
        "pathology": about.pathology,
        "year": str(about.year),
        "landing_page": dg.MetadataValue.url(landing) if landing != UNKNOWN else landing,
        "citation": about.citation,
    }


def build_source_files(partitions: dg.PartitionsDefinition) -> dg.SourceAsset:
    """(Partitioned observable sources are a beta API in Dagster 1.13: its warnings are silenced
    here and in the observation, so that loading the definitions stays quiet.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)

        @dg.observable_source_asset(
            name=SOURCE_ASSET,
            partitions_def=partitions,
            group_name="ingest",
            required_resource_keys={"store"},
            automation_condition=observe_sources(),
            description=(
                "What each sub-dataset's inputs look like before anything is fetched: its "
                "catalog entry and, for `local` and `manual` sources, the listing of its files "
                "(names, sizes, modification times). Observing it (the automation does, every "
                "10 minutes; `make demo` before it builds; *Observe sources* in the UI) marks "
                "`raw_download` stale in exactly the partitions whose entry or files changed."
            ),
        )
        def source_files(context: dg.OpExecutionContext) -> dg.DataVersionsByPartition:
            store: CpiaStore = context.resources.store
            catalog = store.catalog()
            versions = {
                key: source_version(catalog.get(key), store.layout.raw_dir(key))[:16]
                for key in catalog.keys
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", dg.BetaWarning)
                return dg.DataVersionsByPartition(versions)

    return source_files


def build_raw_download(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        partitions_def=partitions,
        deps=[SOURCE_ASSET],
        pool=DOWNLOADS_POOL,
        group_name="ingest",
        code_version="1",
        kinds={"python", "file"},
        description=(
            "Source files of one sub-dataset under `raw/<key>/`, fetched per the catalog's source "
            "spec (local, http, gdc, idc, zenodo, figshare, manual, synthetic), verified by "
            "checksum and size. A rerun fetches nothing already complete. The data version is a "
            "hash of the file records, so downstream partitions go stale only on real changes."
        ),
    )
    def raw_download(
        context: dg.AssetExecutionContext,
        config: DownloadConfig,
        store: CpiaStore,
        partition_locks: PartitionLocks,
    ) -> dg.MaterializeResult:
        key = context.partition_key
        entry = store.entry(key)
        layout = store.layout
        with partition_locks.hold(context, store):  # one build of a partition at a time
            try:
                rows = fetch_source(
                    entry.source,
                    layout.raw_dir(key),
                    settings=settings_from(config, DownloadSettings),
                    progress=progress_logger(context),
                )
            except SourceIncomplete as incomplete:
                # Good files stay on disk and are recorded; the rerun fetches only failed ones.
                write_records(context, layout, "raw_files", incomplete.rows, schema.RAW_FILES)
                write_failures(context, layout, incomplete.failures)
                failures = dg.MetadataValue.md(failures_markdown(incomplete.failures))
                raise dg.Failure(
                    str(incomplete).splitlines()[0], metadata={"failures": failures}
                ) from incomplete
            write_records(context, layout, "raw_files", rows, schema.RAW_FILES)
            write_failures(context, layout, [])
        return dg.MaterializeResult(
            metadata={
                "files": len(rows),
                "bytes": sum(int(r["bytes"]) for r in rows),
                "folder": dg.MetadataValue.path(str(layout.raw_dir(key))),
                "source_type": entry.source["type"],
                **about_metadata(entry),
            },
            data_version=dg.DataVersion(source_data_version(rows)[:16]),
        )

    return raw_download
