"""scale_tiles: the XL/L/M/S tiles of WSI sub-datasets and the partition's tile manifest.

Materialized by the `standardize_and_tile` multi-asset (`standardize.py`): cut in one pass with
standardized_wsi when both are selected, else from the stored standardized slides.
"""

from collections import Counter
from concurrent.futures import Executor
from dataclasses import asdict

import dagster as dg

from cpia_assets.core import schema
from cpia_assets.core.catalog.fields import ALL_SCALES
from cpia_assets.core.catalog.model import SubDataset
from cpia_assets.core.stage import StageResult
from cpia_assets.core.wsi.thumbnails import thumbnails_markdown
from cpia_assets.core.wsi.tile_jobs import tile_partition
from cpia_assets.core.wsi.tiling import TilingSettings, rejection_counts, xl_ratio_text
from cpia_assets.defs.records import (
    config_class,
    failures_markdown,
    failures_table,
    progress_logger,
    read_records,
    write_failures,
    write_records,
)
from cpia_assets.defs.resources import CpiaStore
from cpia_assets.defs.versions import records_data_version

TilingConfig = config_class(TilingSettings, "TilingConfig")

SCALE_TILES = dg.AssetSpec(
    "scale_tiles",
    deps=["standardized_wsi"],
    group_name="standardize",
    code_version="3",  # 3: TILES `phash`
    kinds={"python", "libvips", "parquet"},
    skippable=True,
    description=(
        "WSI sub-datasets: non-overlapping XL tiles (3840 px) with tissue, each cut into the "
        "4x4 L (960), 10x10 M (384) and S (96) cells (a seeded 10% of the 40x40 grid, or "
        "s_rule per_m_tile: one per kept M tile), blank sub-tiles dropped, saved as "
        "`cpia/{L,M,S}/<key>/<slide>-<size>-<x>-<y>.jpg`. Every candidate's metrics (kept or "
        "rejected) go to the partition's Parquet manifest, with `cut_from`: `resampled` when "
        "cut in one pass with standardized_wsi, `standardized_tiff` when cut from the stored "
        "slide (scale_tiles alone). ROI sub-datasets: the standardized ROI images are "
        "registered as the partition's tiles."
    ),
)
RECORD_TABLES = ("tiles", "rejected_tiles", failures_table(SCALE_TILES.key))


def tile_stored_slides(
    context: dg.AssetExecutionContext,
    store: CpiaStore,
    settings: TilingSettings,
    executor: Executor | None,
) -> StageResult:
    """scale_tiles alone: the tiles of the partition's stored standardized slides, or its ROI
    images."""
    key = context.partition_key
    layout = store.layout
    if store.entry(key).kind == "roi":
        return StageResult(records=read_records(layout, key, "roi_images"))
    return tile_partition(
        read_records(layout, key, "slides"),
        key=key,
        layout=layout,
        settings=settings,
        executor=executor,
        progress=progress_logger(context),
    )


def scale_tiles_result(
    context: dg.AssetExecutionContext,
    store: CpiaStore,
    result: StageResult,
    settings: TilingSettings,
) -> dg.MaterializeResult:
    """Write the records of `result` and return scale_tiles' materialization."""
    key = context.partition_key
    entry: SubDataset = store.entry(key)
    layout = store.layout
    if entry.kind == "wsi":
        write_failures(context, layout, result.failures, asset=SCALE_TILES.key)
    write_records(context, layout, "tiles", result.records, schema.TILES, asset=SCALE_TILES.key)
    write_records(
        context, layout, "rejected_tiles", result.rejected, schema.TILES, asset=SCALE_TILES.key
    )
    if entry.kind == "wsi" and not result.records and result.failures:
        raise dg.Failure(
            f"no slide of {key!r} could be tiled",
            metadata={"failures": dg.MetadataValue.md(failures_markdown(result.failures))},
        )
    counts = Counter(row["scale"] for row in result.records)
    metadata: dict[str, dg.RawMetadataValue] = {
        f"images_{scale}": counts.get(scale, 0) for scale in ALL_SCALES
    }
    metadata["images"] = len(result.records)
    if entry.kind == "wsi":
        metadata["ratio_XL_L_M_S"] = xl_ratio_text(counts)
        metadata["tissue_thresholds"] = dg.MetadataValue.json(asdict(settings.thresholds))
        metadata["rejected_candidates"] = len(result.rejected)
        for test, count in rejection_counts(result.rejected).items():
            metadata[f"rejected_{test}"] = count
        metadata["reused_from_earlier_runs"] = result.reused
        metadata["cut_from"] = dg.MetadataValue.json(
            dict(Counter(row["cut_from"] for row in result.records))
        )
        metadata["failures"] = dg.MetadataValue.md(failures_markdown(result.failures))
        thumbnails = thumbnails_markdown(layout, result.records, result.rejected)
        metadata["slide_thumbnails"] = dg.MetadataValue.md(thumbnails)
    return dg.MaterializeResult(
        asset_key=SCALE_TILES.key,
        metadata=metadata,
        data_version=records_data_version(layout, key, RECORD_TABLES, settings),
    )
