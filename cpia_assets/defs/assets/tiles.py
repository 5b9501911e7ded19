"""scale_tiles: the XL/L/M/S tiles of WSI sub-datasets and the partition's tile manifest."""

from collections import Counter
from dataclasses import asdict

import dagster as dg

from cpia_assets.core import schema
from cpia_assets.core.catalog import ALL_SCALES
from cpia_assets.core.integrity import xl_ratio_text
from cpia_assets.core.stage import StageResult
from cpia_assets.core.thumbnails import thumbnails_markdown
from cpia_assets.core.tiling import (
    TilingSettings,
    rejection_counts,
    tile_partition,
    with_thresholds,
)
from cpia_assets.defs.records import (
    config_class,
    failures_markdown,
    progress_logger,
    read_records,
    settings_from,
    write_failures,
    write_records,
)
from cpia_assets.defs.resources import CpiaStore, WorkerPool

TilingConfig = config_class(TilingSettings, "TilingConfig")


def build_scale_tiles(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        partitions_def=partitions,
        deps=["standardized_wsi"],
        group_name="standardize",
        code_version="1",
        kinds={"python", "libvips", "parquet"},
        description=(
            "WSI sub-datasets: non-overlapping XL tiles (3840 px) with tissue, each cut into the "
            "4x4 L (960), 10x10 M (384) and S (96) cells (a seeded 10% of the 40x40 grid, or "
            "s_rule per_m_tile: one per kept M tile), blank sub-tiles dropped, saved as "
            "cpia/{L,M,S}/<key>/<slide>-<size>-<x>-<y>.jpg. Every "
            "candidate's metrics (kept or rejected) go to the partition's Parquet manifest. ROI "
            "sub-datasets: the standardized ROI images are registered as the partition's tiles."
        ),
    )
    def scale_tiles(
        context: dg.AssetExecutionContext,
        config: TilingConfig,
        store: CpiaStore,
        workers: WorkerPool,
    ) -> dg.MaterializeResult:
        key = context.partition_key
        entry = store.entry(key)
        layout = store.layout
        if entry.kind == "roi":
            result = StageResult(records=read_records(layout, key, "roi_images"))
        else:
            slides = read_records(layout, key, "slides")
            settings = with_thresholds(
                settings_from(config, TilingSettings), entry.tissue_thresholds.values()
            )
            with workers.executor() as executor:
                result = tile_partition(
                    slides,
                    key=key,
                    layout=layout,
                    settings=settings,
                    executor=executor,
                    progress=progress_logger(context),
                )
            write_failures(context, layout, result.failures)
        write_records(context, layout, "tiles", result.records, schema.TILES)
        write_records(context, layout, "rejected_tiles", result.rejected, schema.TILES)
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
            metadata["failures"] = dg.MetadataValue.md(failures_markdown(result.failures))
            # issue 11 (orchestration): per-slide thumbnails, kept XL outlined, rejected shaded
            thumbnails = thumbnails_markdown(layout, result.records, result.rejected)
            metadata["slide_thumbnails"] = dg.MetadataValue.md(thumbnails)
        return dg.MaterializeResult(metadata=metadata)

    return scale_tiles
