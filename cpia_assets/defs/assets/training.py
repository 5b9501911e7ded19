"""cpia_mini (per sub-dataset) and training_shards (per data variant): CPIA-Mini and exports."""

from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg

from cpia_assets.core import schema
from cpia_assets.core.catalog.fields import ALL_SCALES
from cpia_assets.core.manifest.mosaic import preview_grid_uri
from cpia_assets.core.schema import MiniReason
from cpia_assets.core.training.exclusions import (
    ExclusionError,
    Exclusions,
    ExclusionSettings,
    matched_rules,
    unmatched_rules,
)
from cpia_assets.core.training.mini import MiniResult, build_mini_partition
from cpia_assets.core.training.mini_sampling import MiniSettings, xl_quota
from cpia_assets.core.training.shards import ShardSettings, export_shards, variant_sidecars
from cpia_assets.core.training.variants import DATA_VARIANTS
from cpia_assets.core.wsi.tiling import xl_ratio_text
from cpia_assets.defs.locks import PartitionLocks
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
from cpia_assets.defs.versions import files_data_version, records_data_version

MiniConfig = config_class(MiniSettings, "MiniConfig")
ShardConfig = config_class(ShardSettings, "ShardConfig")
PREVIEW_PER_SCALE = 6
NAMED_FAILURES = 10
"""Images a failed export names in its message (the metadata lists more)."""
MINI_TABLES = ("mini_images", "mini_selection", "failures-cpia_mini")


def build_cpia_mini(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        partitions_def=partitions,
        deps=["scale_tiles"],
        group_name="mini",
        code_version="2",
        kinds={"python", "libvips", "parquet"},
        description=(
            "CPIA-Mini of one sub-dataset under `cpia-mini/{L,M,S}/<key>/`, every image 384 px. "
            "WSI: an XL quota from the Table I organ row's budget (capped per sub-dataset), XL "
            "tiles spread over the slides, with 16 L, 32 M and one S crop per M each (area "
            "filter when shrinking, Lanczos when enlarging). ROI: unlabelled sets whole, "
            "labelled sets' training split only. The exclusion rules keep evaluation data out. "
            "Records: `mini_images` and `mini_selection` (`in_mini` and its reason per image)."
        ),
    )
    def cpia_mini(
        context: dg.AssetExecutionContext,
        config: MiniConfig,
        store: CpiaStore,
        workers: WorkerPool,
        partition_locks: PartitionLocks,
    ) -> dg.MaterializeResult:
        key = context.partition_key
        layout = store.layout
        settings = settings_from(config, MiniSettings)
        exclusions = _load_exclusions(settings.exclusions)
        quota = xl_quota(store.catalog(), key, settings, exclusions)
        with partition_locks.hold(context, store):  # one build of a partition at a time
            tiles = read_records(layout, key, "tiles")
            unmatched = unmatched_rules(exclusions, matched_rules(key, tiles, exclusions), [key])
            for line in unmatched:
                context.log.warning(line)
            with workers.executor() as executor:
                result = build_mini_partition(
                    store.entry(key),
                    tiles,
                    quota=quota,
                    exclusions=exclusions,
                    layout=layout,
                    settings=settings,
                    executor=executor,
                    progress=progress_logger(context),
                )
            write_records(context, layout, "mini_images", result.records, schema.MINI_IMAGES)
            write_records(
                context, layout, "mini_selection", result.selection, schema.MINI_SELECTION
            )
            write_failures(context, layout, result.failures)
            if quota and not result.records and result.failures:
                raise dg.Failure(
                    f"no Mini image of {key!r} could be made",
                    metadata={"failures": dg.MetadataValue.md(failures_markdown(result.failures))},
                )
            return dg.MaterializeResult(
                metadata=_mini_metadata(result, layout.root)
                | {"exclusion_rules_without_match": dg.MetadataValue.json(unmatched)},
                data_version=records_data_version(
                    layout, key, MINI_TABLES, {"settings": settings, "quota": quota}
                ),
            )

    return cpia_mini


def _load_exclusions(settings: ExclusionSettings) -> Exclusions:
    """The exclusion rules of a Mini or export run; an unusable rule or list fails the run."""
    try:
        return Exclusions.load(settings)
    except ExclusionError as exc:
        raise dg.Failure(str(exc)) from exc


def _mini_metadata(result: MiniResult, root: Path) -> dict[str, Any]:
    counts = Counter(row["scale"] for row in result.records)
    reasons = Counter(row["mini_reason"] for row in result.selection)
    left_out = "\n".join(
        ["| reason | images |", "|---|---|"]
        + [
            f"| {reason} | {n} |"
            for reason, n in sorted(reasons.items())
            if reason != MiniReason.SELECTED
        ]
    )
    preview = {
        scale: [root / row["path"] for row in result.records if row["scale"] == scale][
            :PREVIEW_PER_SCALE
        ]
        for scale in ALL_SCALES
        if counts.get(scale)
    }
    metadata: dict[str, Any] = {f"images_{scale}": counts.get(scale, 0) for scale in ALL_SCALES}
    metadata |= {
        "images": len(result.records),
        "xl_quota": result.quota,
        "quota_used": counts.get("XL", 0),
        "ratio_XL_L_M_S": xl_ratio_text(counts),
        "images_left_out": dg.MetadataValue.md(left_out),
        "reused_from_earlier_run": bool(result.reused),
        "failures": dg.MetadataValue.md(failures_markdown(result.failures)),
    }
    if preview:
        metadata["preview"] = dg.MetadataValue.md(f"![Mini samples]({preview_grid_uri(preview)})")
    return metadata


def build_training_shards() -> dg.AssetsDefinition:
    all_partitions = dg.AllPartitionMapping()

    @dg.asset(
        partitions_def=dg.StaticPartitionsDefinition(list(DATA_VARIANTS)),
        deps=[
            dg.AssetDep("cpia_mini", partition_mapping=all_partitions),
            dg.AssetDep("scale_tiles", partition_mapping=all_partitions),
        ],
        group_name="mini",
        code_version="4",  # 3: percent-encoded sample keys; 4: streamed, md5-keyed shuffle
        kinds={"python", "webdataset"},
        description=(
            "One data variant (cpia-mini, cpia, cpia-l, cpia-m, cpia-s) as WebDataset tar "
            "shards under `shards/<variant>/`: `<key>.jpg` (original bytes) + `<key>.json` "
            "(sub-dataset, organ, scale, label, split, source tile), shuffled across "
            "sub-datasets with a fixed seed, plus `index.json` and `samples.parquet`. Evaluation "
            "data (labelled val/test images, the exclusion rules) is held out as in Mini unless "
            "`apply_exclusions` is off, recorded in the index. Unchanged inputs write nothing."
        ),
    )
    def training_shards(
        context: dg.AssetExecutionContext,
        config: ShardConfig,
        store: CpiaStore,
        workers: WorkerPool,
        partition_locks: PartitionLocks,
    ) -> dg.MaterializeResult:
        variant = context.partition_key
        layout = store.layout
        settings = settings_from(config, ShardSettings)
        exclusions = _load_exclusions(settings.exclusions)
        if not settings.apply_exclusions:
            context.log.warning(f"{variant}: exclusions off: evaluation images are exported too")
        images = variant_sidecars(
            layout, store.catalog(), variant, exclusions if settings.apply_exclusions else None
        )
        missing = images.missing
        if missing:
            context.log.warning(f"{variant}: no records yet for {', '.join(missing)}")
        for line in images.unmatched_rules:
            context.log.warning(line)
        if not images.sidecars:
            raise dg.Failure(f"{variant}: no images to export (partitions not built: {missing})")
        # one export of a variant at a time: a second waits, then finds it up to date
        with partition_locks.hold(context, store, f"shards-{variant}"), workers.executor() as pool:
            result = export_shards(
                images.sidecars,
                variant=variant,
                layout=layout,
                settings=settings,
                held_out=images.held_out,
                executor=pool,
                progress=progress_logger(context),
            )
        if result.failed:
            named = ", ".join(f["file"] for f in result.failures[:NAMED_FAILURES])
            more = result.failed - min(NAMED_FAILURES, len(result.failures))
            raise dg.Failure(
                f"{variant}: {result.failed} of {len(images.sidecars)} selected images "
                f"are missing or damaged, nothing published: {named}"
                + (f" and {more} more" if more > 0 else ""),
                metadata={
                    "failures": dg.MetadataValue.md(
                        failures_markdown(result.failures, total=result.failed)
                    )
                },
            )
        index = result.index
        index_path = layout.shards_dir(variant) / "index.json"
        return dg.MaterializeResult(
            metadata={
                "images": index["images"],
                "shards": len(index["shards"]),
                "per_scale": dg.MetadataValue.json(index["per_scale"]),
                "held_out_for_evaluation": dg.MetadataValue.json(index["held_out"]),
                "written": result.written,
                "partitions_without_records": dg.MetadataValue.json(missing),
                "exclusion_rules_without_match": dg.MetadataValue.json(images.unmatched_rules),
                "index": dg.MetadataValue.path(str(index_path)),
            },
            data_version=files_data_version([index_path], settings),
        )

    return training_shards
