"""standardized_wsi and scale_tiles as one multi-asset (`standardize_and_tile`).

Selected together (a partition run, `--select standardized_wsi,scale_tiles`), WSI slides are
standardized and tiled in one pass (`core/wsi/fused.py`): the tiles are cut from the pixels written
into the standardized TIFF. Either asset can still be materialized alone: standardized_wsi
writes the TIFFs only, scale_tiles cuts the tiles from the stored TIFFs (e.g. after a tissue
threshold change). ROI sub-datasets: standardized_wsi is the ROI crop/resize.
"""

from collections.abc import Iterator
from concurrent.futures import Executor

import dagster as dg

from cpia_assets.core import schema
from cpia_assets.core.downloads.state import verified_digests
from cpia_assets.core.roi.images import RoiSettings
from cpia_assets.core.roi.standardize import standardize_roi_partition
from cpia_assets.core.stage import StageResult
from cpia_assets.core.wsi.fused import standardize_and_tile_partition
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slide_jobs import standardize_partition
from cpia_assets.core.wsi.slides import select_slides
from cpia_assets.core.wsi.standardize import STAGE
from cpia_assets.core.wsi.tiling import TilingSettings, with_thresholds
from cpia_assets.defs.assets.tiles import (
    SCALE_TILES,
    TilingConfig,
    scale_tiles_result,
    tile_stored_slides,
)
from cpia_assets.defs.locks import PartitionLocks
from cpia_assets.defs.records import (
    config_class,
    failures_markdown,
    failures_table,
    progress_logger,
    settings_from,
    write_failures,
    write_records,
)
from cpia_assets.defs.resources import CpiaStore, WorkerPool
from cpia_assets.defs.versions import records_data_version

WsiStandardizeConfig = config_class(StandardizeSettings, "WsiStandardizeConfig")
RoiConfig = config_class(RoiSettings, "RoiConfig")

STANDARDIZED_WSI = dg.AssetSpec(
    "standardized_wsi",
    deps=["raw_download"],
    group_name="standardize",
    code_version="3",  # 3: ROI images' `phash`
    kinds={"python", "openslide", "libvips"},
    skippable=True,
    description=(
        "WSI sub-datasets: every slide resampled to the target microns per pixel (default "
        "0.491) and written as a pyramidal JPEG TIFF under `standardized/<key>/`, with source "
        "MPP, its origin, level and scale factor recorded per slide. ROI sub-datasets: this "
        "stage does the ROI crop/resize instead (largest centred square, 384x384 JPEG, kept "
        "under the catalog's scale folder with label and split). Bad files are recorded in "
        "the failures table and skipped; their siblings finish; a rerun resumes. Raw files "
        "this stage does not use are recorded in the skipped table with the reason."
    ),
)


class StandardizeConfig(dg.Config):
    wsi: WsiStandardizeConfig = WsiStandardizeConfig()  # type: ignore[valid-type]
    roi: RoiConfig = RoiConfig()  # type: ignore[valid-type]
    tiles: TilingConfig = TilingConfig()  # type: ignore[valid-type]


def build_standardize_and_tile(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name="standardize_and_tile",
        specs=[STANDARDIZED_WSI, SCALE_TILES],
        partitions_def=partitions,
        can_subset=True,
    )
    def standardize_and_tile(
        context: dg.AssetExecutionContext,
        config: StandardizeConfig,
        store: CpiaStore,
        workers: WorkerPool,
        partition_locks: PartitionLocks,
    ) -> Iterator[dg.MaterializeResult]:
        entry = store.entry(context.partition_key)
        tiling = with_thresholds(
            settings_from(config.tiles, TilingSettings), entry.tissue_thresholds.values()
        )
        selected = context.selected_asset_keys
        tiles: StageResult | None = None
        # One build of a partition at a time: a second one would delete this one's temporaries.
        with partition_locks.hold(context, store), workers.executor() as executor:
            if STANDARDIZED_WSI.key in selected:
                fused = tiling if SCALE_TILES.key in selected and entry.kind == "wsi" else None
                standardized, tiles = _standardize(context, config, store, executor, fused)
                yield _standardized_result(context, config, store, standardized)
            if SCALE_TILES.key in selected:
                if tiles is None:
                    tiles = tile_stored_slides(context, store, tiling, executor)
                yield scale_tiles_result(context, store, tiles, tiling)

    return standardize_and_tile


def _standardize(
    context: dg.AssetExecutionContext,
    config: StandardizeConfig,
    store: CpiaStore,
    executor: Executor | None,
    fused: TilingSettings | None,
) -> tuple[StageResult, StageResult | None]:
    """standardized_wsi's result and, when `fused` tiling settings are given (WSI only), the
    tiles cut in the same pass."""
    key = context.partition_key
    entry, layout = store.entry(key), store.layout
    raw_dir = layout.raw_dir(key)
    known_sha256 = verified_digests(raw_dir)  # sources raw_download verified need no re-read
    progress = progress_logger(context)
    if entry.kind == "roi":
        result = standardize_roi_partition(
            entry,
            source_dir=raw_dir,
            layout=layout,
            settings=settings_from(config.roi, RoiSettings),
            executor=executor,
            progress=progress,
            known_sha256=known_sha256,
        )
        return result, None
    selection = select_slides(raw_dir, entry.wsi)
    progress(f"{len(selection.used)} slide files, {len(selection.skipped)} skipped")
    partition = {
        "key": key,
        "layout": layout,
        "options": entry.wsi,
        "executor": executor,
        "known_sha256": known_sha256,
    }
    settings = settings_from(config.wsi, StandardizeSettings)
    tiles = None
    if fused is None:
        result = standardize_partition(
            selection.used, settings=settings, progress=progress, **partition
        )
    else:
        result, tiles = standardize_and_tile_partition(
            selection.used, settings=settings, tiling=fused, progress=progress, **partition
        )
    result.skipped = selection.skipped_rows(layout.stored(raw_dir))
    result.failures += selection.refused_rows(layout.stored(raw_dir), STAGE)
    return result, tiles


def _standardized_result(
    context: dg.AssetExecutionContext,
    config: StandardizeConfig,
    store: CpiaStore,
    result: StageResult,
) -> dg.MaterializeResult:
    """Write standardized_wsi's records and return its materialization."""
    key = context.partition_key
    entry, layout = store.entry(key), store.layout
    asset = STANDARDIZED_WSI.key
    table, columns = (
        ("slides", schema.SLIDES) if entry.kind == "wsi" else ("roi_images", schema.TILES)
    )
    write_records(context, layout, table, result.records, columns, asset=asset)
    write_failures(context, layout, result.failures, asset=asset)
    write_records(context, layout, "skipped", result.skipped, schema.SKIPPED, asset=asset)
    if not result.records:
        raise dg.Failure(
            f"no usable {entry.kind.upper()} input for {key!r} under {layout.raw_dir(key)} "
            f"({len(result.failures)} failed)",
            metadata={"failures": dg.MetadataValue.md(failures_markdown(result.failures))},
        )
    settings = config.wsi if entry.kind == "wsi" else config.roi
    tables = (table, failures_table(asset), "skipped")
    return dg.MaterializeResult(
        asset_key=asset,
        metadata={
            "outputs": len(result.records),
            "reused_from_earlier_runs": result.reused,
            "failed_files": len(result.failures),
            "skipped_files": len(result.skipped),
            "failures": dg.MetadataValue.md(failures_markdown(result.failures)),
        },
        data_version=records_data_version(layout, key, tables, settings.model_dump()),
    )
