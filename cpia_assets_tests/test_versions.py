"""Data versions from content and what Dagster marks stale: digests ignore per-run columns; on
real runs an unchanged rerun keeps every data version, and a changed source file makes exactly its
own partition's downstream assets stale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from cpia_assets.core.catalog import load_catalog
from cpia_assets.core.digests import files_digest, records_digest
from cpia_assets.core.fsutil import write_parquet_atomic
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.mini import MiniSettings
from cpia_assets.definitions import PARTITIONED_ASSETS, build_definitions
from cpia_assets.defs.versions import partitions_to_rebuild

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

    def build(self, key: str) -> dict[str, str]:
        """Materialize the partition; the data version of each asset."""
        result = self.defs.resolve_implicit_global_asset_job_def().execute_in_process(
            partition_key=key,
            asset_selection=[dg.AssetKey(name) for name in PARTITIONED_ASSETS],
            instance=self.instance,
        )
        return {
            name: result.asset_materializations_for_node(name)[0].tags["dagster/data_version"]
            for name in PARTITIONED_ASSETS
        }

    def to_rebuild(self) -> list[str]:
        return partitions_to_rebuild(
            self.instance, self.defs, PARTITIONED_ASSETS, ["cells-a", "cells-b"]
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
    defs = build_definitions(load_catalog(catalog_path), tmp_path / "data", workers=1)
    with dg.instance_for_test() as instance:
        yield Platform(defs, instance, tmp_path)


def test_unchanged_rerun_keeps_data_versions_and_nothing_is_stale(platform: Platform) -> None:
    assert platform.to_rebuild() == ["cells-a", "cells-b"]  # never materialized
    first = {key: platform.build(key) for key in ("cells-a", "cells-b")}
    assert platform.to_rebuild() == []
    assert platform.build("cells-a") == first["cells-a"]
    assert first["cells-a"]["raw_download"] != first["cells-b"]["raw_download"]
    assert platform.to_rebuild() == []


def test_changed_source_file_makes_only_its_partition_stale(platform: Platform) -> None:
    first = {key: platform.build(key) for key in ("cells-a", "cells-b")}
    _cell(platform.sources / "a" / "cell-0.png", seed=99)
    job = platform.defs.resolve_implicit_global_asset_job_def()
    job.execute_in_process(
        partition_key="cells-a",
        asset_selection=[dg.AssetKey("raw_download")],
        instance=platform.instance,
    )
    assert platform.to_rebuild() == ["cells-a"]
    rebuilt = platform.build("cells-a")
    assert rebuilt["raw_download"] != first["cells-a"]["raw_download"]
    assert rebuilt["cpia_mini"] != first["cells-a"]["cpia_mini"]
    assert platform.to_rebuild() == []
