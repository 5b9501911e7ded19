"""standardized_wsi: slides resampled to one MPP; for ROI sub-datasets, the ROI crop/resize."""

import dagster as dg

from cpia_assets.core import schema
from cpia_assets.core.roi import RoiSettings, standardize_roi_partition
from cpia_assets.core.slides import select_slides
from cpia_assets.core.stage import StageResult
from cpia_assets.core.standardize import STAGE, StandardizeSettings, standardize_partition
from cpia_assets.defs.records import (
    config_class,
    failures_markdown,
    progress_logger,
    settings_from,
    write_failures,
    write_records,
)
from cpia_assets.defs.resources import CpiaStore, WorkerPool

WsiStandardizeConfig = config_class(StandardizeSettings, "WsiStandardizeConfig")
RoiConfig = config_class(RoiSettings, "RoiConfig")


class StandardizeConfig(dg.Config):
    wsi: WsiStandardizeConfig = WsiStandardizeConfig()  # type: ignore[valid-type]
    roi: RoiConfig = RoiConfig()  # type: ignore[valid-type]


def build_standardized_wsi(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        partitions_def=partitions,
        deps=["raw_download"],
        group_name="standardize",
        code_version="1",
        kinds={"python", "openslide", "libvips"},
        description=(
            "WSI sub-datasets: every slide resampled to the target microns per pixel (default "
            "0.491) and written as a pyramidal JPEG TIFF under standardized/<key>/, with source "
            "MPP, its origin, level and scale factor recorded per slide. ROI sub-datasets: this "
            "stage does the ROI crop/resize instead (largest centred square, 384x384 JPEG, kept "
            "under the catalog's scale folder with label and split). Bad files are recorded in "
            "the failures table and skipped; their siblings finish; a rerun resumes. Raw files "
            "this stage does not use are recorded in the skipped table with the reason."
        ),
    )
    def standardized_wsi(
        context: dg.AssetExecutionContext,
        config: StandardizeConfig,
        store: CpiaStore,
        workers: WorkerPool,
    ) -> dg.MaterializeResult:
        key = context.partition_key
        entry = store.entry(key)
        layout = store.layout
        raw_dir = layout.raw_dir(key)
        progress = progress_logger(context)
        with workers.executor() as executor:
            if entry.kind == "wsi":
                selection = select_slides(raw_dir, entry.wsi)
                progress(f"{len(selection.used)} slide files, {len(selection.skipped)} skipped")
                result: StageResult = standardize_partition(
                    selection.used,
                    key=key,
                    layout=layout,
                    options=entry.wsi,
                    settings=settings_from(config.wsi, StandardizeSettings),
                    executor=executor,
                    progress=progress,
                )
                result.skipped = selection.skipped_rows(layout.stored(raw_dir))
                result.failures += selection.refused_rows(layout.stored(raw_dir), STAGE)
                table, columns = "slides", schema.SLIDES
            else:
                result = standardize_roi_partition(
                    entry,
                    source_dir=raw_dir,
                    layout=layout,
                    settings=settings_from(config.roi, RoiSettings),
                    executor=executor,
                    progress=progress,
                )
                table, columns = "roi_images", schema.TILES
        write_records(context, layout, table, result.records, columns)
        write_failures(context, layout, result.failures)
        write_records(context, layout, "skipped", result.skipped, schema.SKIPPED)
        if not result.records:
            raise dg.Failure(
                f"no usable {entry.kind.upper()} input for {key!r} under {raw_dir} "
                f"({len(result.failures)} failed)",
                metadata={"failures": dg.MetadataValue.md(failures_markdown(result.failures))},
            )
        return dg.MaterializeResult(
            metadata={
                "outputs": len(result.records),
                "reused_from_earlier_runs": result.reused,
                "failed_files": len(result.failures),
                "skipped_files": len(result.skipped),
                "failures": dg.MetadataValue.md(failures_markdown(result.failures)),
            }
        )

    return standardized_wsi
