"""tile_manifest: the single writer of manifest.duckdb, and the manifest's integrity checks.

Partitioned assets only write Parquet under manifests/<key>/; this unpartitioned asset loads the
files changed since its last run. It and its checks share the pool "duckdb" (limit 1), so no two
of them ever open the database file at once. All SQL lives in core/manifest/.

Annotations stay real classes (no `from __future__ import annotations`): Dagster reads the
context and resource types off the signatures.
"""

from collections.abc import Iterator

import dagster as dg

from cpia_assets.core.manifest import integrity, mosaic
from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets.core.manifest.paper_table_i import TABLE_I_NOTE, beside_paper
from cpia_assets.core.manifest.queries import built_vs_published, markdown_table, table_i
from cpia_assets.defs.instance import DUCKDB_POOL as POOL
from cpia_assets.defs.records import failures_markdown
from cpia_assets.defs.resources import CpiaStore

UPSTREAM = ("raw_download", "standardized_wsi", "scale_tiles", "cpia_mini")


def build_manifest_assets() -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    @dg.asset(
        deps=[dg.AssetKey(key) for key in UPSTREAM],
        pool=POOL,
        group_name="manifest",
        code_version="2",
        kinds={"duckdb", "parquet"},
        description=(
            "`manifest.duckdb`: the per-partition Parquet records of every sub-dataset in tables "
            "`tiles`, `rejected_tiles`, `roi_images`, `slides`, `raw_files`, `failures`, "
            "`skipped`, `mini_images` and `mini_selection` (copied onto `tiles.in_mini` / "
            "`mini_reason`); views `lineage` (image -> parent tiles -> standardized slide -> "
            "source file and sha256, with each stage's run id and code version), `table_i` (the "
            "paper's Table I) and `built_vs_published` (images per scale vs the paper's counts). "
            "Only files "
            "changed since the last run are reloaded, in one transaction. Also draws a sample "
            "mosaic (the paper's Fig. 3) beside the database. Query it with `cpia` / "
            "`python -m cpia_assets`."
        ),
    )
    def tile_manifest(context: dg.AssetExecutionContext, store: CpiaStore) -> dg.MaterializeResult:
        layout = store.layout
        report = load_manifest(layout, store.catalog(), on_wait=context.log.warning)
        for problem in report.problems:
            context.log.warning(f"{problem['file']}: {problem['reason']}")
        picture = mosaic.mosaic_path(layout)
        with open_manifest(layout, on_wait=context.log.warning) as con:
            table = markdown_table(beside_paper(table_i(con)))
            compared = markdown_table(built_vs_published(con, built_only=True))
            if report.touched or not picture.exists():
                mosaic.build_mosaic(con, layout, picture)
        metadata: dict[str, dg.RawMetadataValue] = {
            f"rows_{name}": count for name, count in report.rows.items()
        }
        metadata |= {
            "partitions_reloaded": dg.MetadataValue.json(report.reloaded_partitions),
            "partitions_unchanged": len(report.unchanged_partitions),
            "files_loaded": len(report.loaded),
            "files_removed": len(report.removed),
            "files_unchanged": report.unchanged,
            "unusable_files": dg.MetadataValue.md(failures_markdown(report.problems)),
            "table_i": dg.MetadataValue.md(f"{TABLE_I_NOTE}\n\n{table}"),
            "built_vs_published": dg.MetadataValue.md(compared),
            "mosaic": dg.MetadataValue.path(str(picture)),
            "mosaic_preview": dg.MetadataValue.md(
                f"![sample images per sub-dataset and scale]({mosaic.preview_data_uri(picture)})"
            ),
            "duckdb": dg.MetadataValue.path(str(layout.duckdb_path)),
        }
        return dg.MaterializeResult(metadata=metadata)

    specs = {
        name: dg.AssetCheckSpec(name, asset=tile_manifest, description=description)
        for name, description in integrity.CHECKS.items()
    }

    @dg.multi_asset_check(specs=list(specs.values()), pool=POOL, can_subset=True)
    def manifest_checks(
        context: dg.AssetCheckExecutionContext, store: CpiaStore
    ) -> Iterator[dg.AssetCheckResult]:
        """All checks in one step: one read-only connection, one pool slot, one folder walk."""
        selected = [key.name for key in context.selected_asset_check_keys]
        with open_manifest(store.layout, on_wait=context.log.warning) as con:
            outcomes = integrity.run_checks(con, store.layout, selected)
        for name, outcome in outcomes.items():
            yield _check_result(outcome, specs[name])

    return [tile_manifest, manifest_checks]


def _check_result(outcome: integrity.CheckOutcome, spec: dg.AssetCheckSpec) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed,
        asset_key=spec.asset_key,
        check_name=spec.name,
        description=outcome.summary,
        metadata={"summary": outcome.summary, "details": dg.MetadataValue.json(outcome.details)},
    )
