"""A full disk fails the step with the path, leaves nothing half-written, and a rerun with room
completes: real Dagster runs writing onto real, small tmpfs mounts."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import pyvips

from cpia_assets.core import schema
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.model import Catalog, SubDataset, WsiOptions
from cpia_assets.core.fsutil import OutputWriteError, output_fault, write_parquet_atomic, writing
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest.database import ManifestError
from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets.core.stage import StageResult
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slide_jobs import standardize_partition
from cpia_assets.definitions import build_definitions
from cpia_assets_tests.support.slide_factory import build_40x_slide
from cpia_assets_tests.support.small_disk import resize, tmpfs

KEY = "wsi-20x"


def _materialize(
    defs: dg.Definitions, instance: dg.DagsterInstance, asset: str
) -> dg.ExecuteInProcessResult:
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        partition_key=KEY,
        asset_selection=[dg.AssetKey(asset)],
        instance=instance,
        raise_on_error=False,
    )


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    (event,) = result.get_step_failure_events()
    error = event.step_failure_data.error
    return error.message + (error.cause.message if error.cause else "")


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def wsi_run(small_catalog_path: Path, tmp_path: Path):
    """Definitions over a data folder whose raw slides are downloaded, with two workers."""
    defs = build_definitions(load_catalog(small_catalog_path), tmp_path, workers=2)
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance, "raw_download").success
        yield defs, instance, DataLayout(tmp_path)


def test_disk_full_fails_standardize_and_tiling_and_a_rerun_with_room_completes(wsi_run) -> None:
    defs, instance, layout = wsi_run
    standardized = layout.root / "standardized"
    with tmpfs(standardized, "256k"):
        result = _materialize(defs, instance, "standardized_wsi")
        assert not result.success
        message = _failure_message(result)
        assert "disk full" in message and "No space left on device" in message
        assert str(layout.standardized_dir(KEY)) in message
        assert "cannot read" not in message
        assert _files(standardized) == []  # no TIFF, no temporary left
        assert not layout.manifest_file(KEY, "slides").exists()
        assert not layout.manifest_file(KEY, "failures-standardized_wsi").exists()

        resize(standardized, "64m")
        assert _materialize(defs, instance, "standardized_wsi").success
        slides = pl.read_parquet(layout.manifest_file(KEY, "slides"))
        assert slides.height == 2
        assert _files(standardized) == [f"{KEY}/T20-0001.tiff", f"{KEY}/T20-0002.tiff"]

        with tmpfs(layout.cpia_dir, "256k"):
            result = _materialize(defs, instance, "scale_tiles")
            assert not result.success
            message = _failure_message(result)
            assert "disk full" in message and str(layout.cpia_dir) in message
            assert "cannot read the standardized slide" not in message
            assert _files(layout.cpia_dir) == []  # no tile, no staging folder
            assert not layout.manifest_file(KEY, "tiles").exists()
            assert list(layout.manifest_dir(KEY).glob("parts/tiles/*")) == []

            resize(layout.cpia_dir, "64m")
            result = _materialize(defs, instance, "scale_tiles")
            assert result.success
            tiles = pl.read_parquet(layout.manifest_file(KEY, "tiles"))
            assert tiles.height > 0
            written = {f"cpia/{path}" for path in _files(layout.cpia_dir)}
            assert written == set(tiles["path"])
            failures = pl.read_parquet(layout.manifest_file(KEY, "failures-scale_tiles"))
            assert failures.height == 0


def test_disk_full_on_the_libvips_shrinking_path_raises_and_leaves_nothing(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "data")
    slide = build_40x_slide(layout.raw_dir(KEY) / "S40-0001.tiff", 3000)

    def run() -> StageResult:
        return standardize_partition(
            [slide], key=KEY, layout=layout, options=WsiOptions(), settings=StandardizeSettings()
        )

    with tmpfs(layout.root / "standardized", "64k") as folder:
        with pytest.raises(OutputWriteError, match="disk full") as raised:
            run()
        assert raised.value.path == str(layout.standardized_dir(KEY) / "S40-0001.tiff")
        assert raised.value.reason == "No space left on device"
        assert _files(folder) == []
        resize(folder, "16m")
        assert [row["level"] for row in run().records] == [0]


def test_disk_full_while_the_manifest_commits_reports_the_real_error(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "data")
    rows = [
        dict.fromkeys(schema.TILES) | {"image_name": f"{index:x}" * 4, "scale": "M", "x": index}
        for index in range(60_000)
    ]
    frame = schema.frame(rows, schema.TILES).with_columns(
        run_id=pl.lit("run-1"), code_version=pl.lit("1")
    )
    catalog = Catalog(
        tmp_path / "catalog.yaml",
        (SubDataset(key=KEY, name=KEY, kind="wsi", organ="colon", source={"type": "manual"}),),
    )
    with tmpfs(layout.root, "16m"):
        write_parquet_atomic(frame, layout.manifest_file(KEY, "tiles"))
        filler = layout.root / "filler"
        filler.write_bytes(bytes(_free_bytes(layout.root) - (256 << 10)))  # 256 KiB left
        with pytest.raises(ManifestError) as raised:
            load_manifest(layout, catalog)
        message = str(raised.value)
        assert "no transaction is active" not in message
        assert f"disk full: cannot write {layout.duckdb_path}: No space left on device" in message
        filler.unlink()
        report = load_manifest(layout, catalog)
        assert report.rows["tiles"] == 60_000


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def test_a_read_only_file_system_is_an_output_fault_naming_the_final_path(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "out", "1m") as folder:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        with pytest.raises(OutputWriteError, match="output device error") as raised:
            write_parquet_atomic(pl.DataFrame({"a": [1]}), folder / "x.parquet")
        assert raised.value.path == str(folder / "x.parquet")
        assert raised.value.reason == "Read-only file system"


def test_faults_of_the_input_are_not_blamed_on_the_disk(tmp_path: Path) -> None:
    output = tmp_path / "out" / "slide.tiff"
    failing_read = OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "raw" / "a.svs"))
    assert output_fault(failing_read, output) is None
    failing_write = OSError(errno.EIO, os.strerror(errno.EIO), str(output))
    assert output_fault(failing_write, output).reason == "Input/output error"
    corrupt = pyvips.Error("unable to call tiffsave", "a.svs: JPEG decode error\nEOF")
    assert output_fault(corrupt, output) is None
    with pytest.raises(pyvips.Error), writing(output):
        raise corrupt
