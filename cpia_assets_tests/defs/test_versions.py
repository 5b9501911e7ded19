"""Data versions from content, what Dagster marks stale and what the automation launches: digests
ignore per-run columns; on real runs an unchanged rerun keeps every data version and launches
nothing, a changed source file makes exactly its own partition's downstream assets stale and
rebuilds them, a new catalog entry is built, and the manifest follows its partitions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.digests import files_digest, records_digest
from cpia_assets.core.fsutil import write_parquet_atomic
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.mini_sampling import MiniSettings
from cpia_assets.definitions import (
    AUTOMATED_ASSETS,
    MANIFEST_ASSET,
    OBSERVE_JOB,
    PARTITIONED_ASSETS,
    build_definitions,
)
from cpia_assets.defs.assets.downloads import SOURCE_ASSET
from cpia_assets.defs.versions import partitions_to_rebuild
from cpia_assets_tests.support.outputs import materialization_of

CATALOG = """\
subdatasets:
- key: cells-a
  name: Cells A
  kind: roi
  organ: blood
  scale: S
  source: {type: local, path: a, mode: copy}
- key: cells-b
  name: Cells B
  kind: roi
  organ: blood
  scale: S
  source: {type: local, path: b, mode: copy}
"""
ROWS = [{"name": "x", "value": 1}, {"name": "y", "value": None}]


def _write(layout: DataLayout, rows: list[dict], run_id: str, table: str = "t") -> None:
    frame = pl.DataFrame(rows).with_columns(run_id=pl.lit(run_id), code_version=pl.lit("1"))
    write_parquet_atomic(frame, layout.manifest_file("k", table))


def test_record_digest_ignores_row_order_and_run_columns(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    _write(layout, ROWS, "run-1")
    first = records_digest(layout, "k", ["t"], MiniSettings())
    _write(layout, ROWS[::-1], "run-2")
    assert records_digest(layout, "k", ["t"], MiniSettings()) == first


def test_record_digest_follows_values_settings_and_tables(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    _write(layout, ROWS, "run-1")
    first = records_digest(layout, "k", ["t"], MiniSettings())
    assert records_digest(layout, "k", ["t"], MiniSettings(seed=1)) != first
    assert records_digest(layout, "k", ["t", "other"], MiniSettings()) != first
    _write(layout, [ROWS[0], {"name": "y", "value": 2}], "run-1")
    assert records_digest(layout, "k", ["t"], MiniSettings()) != first


def test_files_digest_follows_bytes(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_text("{}")
    first = files_digest([path], {"seed": 0})
    assert files_digest([path], {"seed": 0}) == first
    assert files_digest([path], {"seed": 1}) != first
    path.write_text('{"a": 1}')
    assert files_digest([path], {"seed": 0}) != first


@dataclass
class Platform:
    defs: dg.Definitions
    instance: dg.DagsterInstance
    sources: Path
    cursor: object = None
    clock: datetime = field(default_factory=lambda: datetime(2026, 1, 1, 0, 1, tzinfo=UTC))

    def automation_tick(self, minutes: int = 1) -> dict[str, set[str | None]]:
        """One evaluation of the automation sensor's conditions: what it would launch."""
        self.clock += timedelta(minutes=minutes)
        result = dg.evaluate_automation_conditions(
            self.defs, self.instance, evaluation_time=self.clock, cursor=self.cursor
        )
        self.cursor = result.cursor
        names = [SOURCE_ASSET, *AUTOMATED_ASSETS]
        requested = {name: result.get_requested_partitions(dg.AssetKey(name)) for name in names}
        return {name: keys for name, keys in requested.items() if keys}

    def observe(self) -> None:
        job = self.defs.resolve_job_def(OBSERVE_JOB)
        assert job.execute_in_process(instance=self.instance).success

    def download(self, key: str) -> None:
        self.defs.resolve_implicit_global_asset_job_def().execute_in_process(
            partition_key=key, asset_selection=[dg.AssetKey("raw_download")], instance=self.instance
        )

    def build(self, key: str) -> dict[str, str]:
        """Materialize the partition; the data version of each asset."""
        result = self.defs.resolve_implicit_global_asset_job_def().execute_in_process(
            partition_key=key,
            asset_selection=[dg.AssetKey(name) for name in PARTITIONED_ASSETS],
            instance=self.instance,
        )
        return {
            name: materialization_of(result, name).tags["dagster/data_version"]
            for name in PARTITIONED_ASSETS
        }

    def to_rebuild(self) -> list[str]:
        return partitions_to_rebuild(
            self.instance,
            self.defs.resolve_asset_graph(),
            PARTITIONED_ASSETS,
            ["cells-a", "cells-b"],
        )


def _cell(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def platform(tmp_path: Path):
    for folder, seed in (("a", 1), ("b", 5)):
        for index in range(2):
            _cell(tmp_path / folder / f"cell-{index}.png", seed + index)
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(CATALOG)
    (tmp_path / "one.yaml").write_text(CATALOG.split("- key: cells-b")[0])
    defs = build_definitions(load_catalog(catalog_path), tmp_path / "data", workers=1)
    with dg.instance_for_test() as instance:
        yield Platform(defs, instance, tmp_path)


def test_unchanged_rerun_keeps_data_versions_and_nothing_is_stale(platform: Platform) -> None:
    platform.observe()
    assert platform.to_rebuild() == ["cells-a", "cells-b"]  # never materialized
    first = {key: platform.build(key) for key in ("cells-a", "cells-b")}
    assert platform.to_rebuild() == []
    platform.observe()
    assert platform.to_rebuild() == []
    assert platform.build("cells-a") == first["cells-a"]
    assert first["cells-a"]["raw_download"] != first["cells-b"]["raw_download"]
    assert platform.to_rebuild() == []


def test_changed_source_file_makes_only_its_partition_stale(platform: Platform) -> None:
    platform.observe()
    first = {key: platform.build(key) for key in ("cells-a", "cells-b")}
    _cell(platform.sources / "a" / "cell-0.png", seed=99)
    assert platform.to_rebuild() == []  # not observed yet
    platform.observe()
    assert platform.to_rebuild() == ["cells-a"]
    rebuilt = platform.build("cells-a")
    assert rebuilt["raw_download"] != first["cells-a"]["raw_download"]
    assert rebuilt["cpia_mini"] != first["cells-a"]["cpia_mini"]
    assert platform.to_rebuild() == []


def test_changed_catalog_entry_makes_only_its_partition_stale(platform: Platform) -> None:
    platform.observe()
    for key in ("cells-a", "cells-b"):
        platform.build(key)
    changed = CATALOG.replace(
        "scale: S\n  source: {type: local, path: b", "scale: M\n  source: {type: local, path: b"
    )
    (platform.sources / "catalog.yaml").write_text(changed)
    platform.defs = build_definitions(
        load_catalog(platform.sources / "catalog.yaml"), platform.sources / "data", workers=1
    )
    platform.observe()
    assert platform.to_rebuild() == ["cells-b"]


def test_automation_rebuilds_changed_partitions_only(platform: Platform) -> None:
    platform.observe()
    for key in ("cells-a", "cells-b"):
        platform.build(key)
    platform.automation_tick()  # the sensor's first tick
    platform.observe()  # nothing changed: same versions
    platform.download("cells-b")  # same files: same data version
    assert platform.automation_tick() == {}
    _cell(platform.sources / "a" / "cell-1.png", seed=77)
    platform.observe()
    assert platform.automation_tick() == {name: {"cells-a"} for name in PARTITIONED_ASSETS}
    assert platform.automation_tick() == {}  # requested once, not again while it runs


def test_automation_builds_a_new_catalog_entry(platform: Platform) -> None:
    platform.defs = build_definitions(
        load_catalog(platform.sources / "one.yaml"), platform.sources / "data", workers=1
    )
    platform.observe()
    platform.build("cells-a")
    platform.automation_tick()
    platform.defs = build_definitions(
        load_catalog(platform.sources / "catalog.yaml"), platform.sources / "data", workers=1
    )
    assert platform.automation_tick() == {SOURCE_ASSET: {"cells-b"}}  # observe it first
    platform.observe()
    assert platform.automation_tick() == {name: {"cells-b"} for name in PARTITIONED_ASSETS}


def test_sources_are_observed_and_manifest_follows_its_partitions(platform: Platform) -> None:
    platform.observe()
    platform.automation_tick()
    platform.build("cells-a")
    assert platform.automation_tick(minutes=1) == {}  # 00:03, no cron tick
    ticked = platform.automation_tick(minutes=10)  # 00:13, after the 00:10 tick
    assert ticked == {SOURCE_ASSET: {"cells-a", "cells-b"}, MANIFEST_ASSET: {None}}
    platform.defs.resolve_job_def("refresh_manifest").execute_in_process(instance=platform.instance)
    assert MANIFEST_ASSET not in platform.automation_tick(minutes=10)  # nothing new since


def test_manifest_schedule_runs_only_when_a_partition_changed(platform: Platform) -> None:
    schedule = platform.defs.resolve_schedule_def("manifest_refresh")

    def tick() -> list[dg.RunRequest]:
        with dg.build_schedule_context(
            instance=platform.instance, repository_def=platform.defs.get_repository_def()
        ) as context:
            return list(schedule.evaluate_tick(context).run_requests or [])

    platform.observe()
    platform.build("cells-a")
    assert len(tick()) == 1  # never loaded
    platform.defs.resolve_job_def("refresh_manifest").execute_in_process(instance=platform.instance)
    assert tick() == []  # up to date: skipped
    _cell(platform.sources / "a" / "cell-0.png", seed=42)
    platform.observe()
    platform.build("cells-a")
    assert len(tick()) == 1
