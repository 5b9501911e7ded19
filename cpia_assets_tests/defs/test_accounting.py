"""Nothing lost, nothing silent: real Dagster runs on local sources holding links to folders,
files that are neither slides nor images, and a name that is not UTF-8; every raw file ends as
an output, a failure or a skip, and the manifest check `raw_files_accounted` says so."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.fsutil import write_parquet_atomic
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest import integrity
from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.definitions import build_definitions
from cpia_assets.defs.instance import ensure_pool_limits
from cpia_assets_tests.support.outputs import check_results
from cpia_assets_tests.support.paths import TESTDATA

BAD_NAME = os.fsdecode(b"caf\xff.png")
CATALOG = """\
subdatasets:
- key: roi-local
  name: ROI local
  kind: roi
  organ: blood
  scale: S
  splits: {from: csv, file: splits.csv, image_column: image, column: split}
  source: {type: local, path: rois}
- key: wsi-local
  name: WSI local
  kind: wsi
  organ: breast
  source: {type: local, path: slides}
"""


@dataclass
class Run:
    layout: DataLayout
    defs: dg.Definitions
    instance: dg.DagsterInstance
    rois: Path

    def partition(self, key: str, *assets: str) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_implicit_global_asset_job_def()
        return job.execute_in_process(
            partition_key=key,
            asset_selection=[dg.AssetKey(name) for name in assets],
            instance=self.instance,
            raise_on_error=False,
        )

    def checks(self) -> dict[str, bool]:
        job = self.defs.resolve_job_def("refresh_manifest")
        return check_results(job.execute_in_process(instance=self.instance))

    def records(self, key: str, table: str) -> pl.DataFrame:
        return pl.read_parquet(self.layout.manifest_file(key, table))


def cell(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("accounting")
    rois, elsewhere, slides = root / "rois", root / "elsewhere", root / "slides"
    for folder in (rois / "a", elsewhere / "deep", slides):
        folder.mkdir(parents=True)
    Image.fromarray(cell(1)).save(rois / "a" / "one.png")
    Image.fromarray(cell(2)).save(elsewhere / "deep" / "two.jpg")
    (rois / "linked").symlink_to(elsewhere)
    frames = [Image.fromarray(cell(seed)) for seed in (3, 4)]
    frames[0].save(rois / "moving.gif", save_all=True, append_images=frames[1:], duration=100)
    (rois / "notes.txt").write_text("scanned 2019")
    (rois / "splits.csv").write_text("image,split\na/one.png,train\nlinked/deep/two.jpg,test\n")
    (rois / BAD_NAME).write_bytes((rois / "a" / "one.png").read_bytes())
    (slides / "CMU-1.svs").symlink_to(TESTDATA / "CMU-1-Small-Region.svs")
    (slides / "broken.tiff").symlink_to(TESTDATA / "openslide-unopenable.tiff")
    (slides / "readme.txt").write_text("slides")
    (root / "catalog.yaml").write_text(CATALOG)
    layout = DataLayout(root / "data")
    defs = build_definitions(load_catalog(root / "catalog.yaml"), layout.root, workers=1)
    with dg.instance_for_test() as instance:
        ensure_pool_limits(instance)
        yield Run(layout, defs, instance, rois)


def test_a_bad_name_fails_alone_and_the_partition_then_accounts_for_every_file(run: Run) -> None:
    first = run.partition("roi-local", "raw_download")
    assert not first.success
    raw = run.records("roi-local", "raw_files")
    assert sorted(raw["rel_path"]) == [
        "a/one.png", "linked/deep/two.jpg", "moving.gif", "notes.txt", "splits.csv",
    ]  # fmt: skip
    failures = run.records("roi-local", "failures-raw_download").select("file", "reason")
    assert failures.rows() == [("caf\\xff.png", "the name is not valid UTF-8; rename it")]
    assert run.checks()["raw_files_accounted"]  # not standardized yet: pending, not unaccounted
    with open_manifest(run.layout) as con:
        pending = integrity.raw_files_accounted(con).details
    assert (pending["raw_files"], pending["checked"], pending["pending_partitions"]) == (5, 0, 1)

    (run.rois / BAD_NAME).rename(run.rois / "cafe.png")
    (run.rois / "splits.csv").write_text(
        "image,split\na/one.png,train\nlinked/deep/two.jpg,test\ncafe.png,val\n"
    )
    for key in ("roi-local", "wsi-local"):
        assert run.partition(key, "raw_download", "standardized_wsi").success, key
    images = run.records("roi-local", "roi_images").sort("source_file")
    assert images["source_file"].to_list() == [
        "raw/roi-local/a/one.png", "raw/roi-local/cafe.png", "raw/roi-local/linked/deep/two.jpg",
    ]  # fmt: skip
    assert images["split"].to_list() == ["train", "val", "test"]
    known = ".bmp, .jpeg, .jpg, .png, .tif, .tiff"
    assert run.records("roi-local", "skipped").select("file", "reason").rows() == [
        ("raw/roi-local/moving.gif", f"not an image of a known type (.gif; known: {known})"),
        ("raw/roi-local/notes.txt", f"not an image of a known type (.txt; known: {known})"),
        ("raw/roi-local/splits.csv", "label or split table of the catalog"),
    ]
    assert run.records("wsi-local", "slides")["source_file"].to_list() == [
        "raw/wsi-local/CMU-1.svs"
    ]
    assert run.records("wsi-local", "failures-standardized_wsi")["file"].to_list() == [
        "raw/wsi-local/broken.tiff"
    ]
    assert run.records("wsi-local", "skipped").select("file", "reason").rows() == [
        ("raw/wsi-local/readme.txt", "not a slide file (.txt)")
    ]
    assert run.checks()["raw_files_accounted"]


def test_a_raw_file_dropped_without_a_trace_fails_the_check(run: Run) -> None:
    """Runs after the test above, on the partitions it standardized."""
    skipped_file = run.layout.manifest_file("roi-local", "skipped")
    original = pl.read_parquet(skipped_file)
    write_parquet_atomic(original.filter(~pl.col("file").str.ends_with(".gif")), skipped_file)
    try:
        assert run.checks()["raw_files_accounted"] is False
        with open_manifest(run.layout) as con:
            outcome = integrity.raw_files_accounted(con)
    finally:
        write_parquet_atomic(original, skipped_file)
    assert outcome.details["unaccounted_examples"] == [
        {"subdataset": "roi-local", "file": "raw/roi-local/moving.gif"}
    ]
    assert (outcome.details["checked"], outcome.details["pending_partitions"]) == (9, 0)
    assert run.checks()["raw_files_accounted"] is True
