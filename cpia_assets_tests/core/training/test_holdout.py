"""Evaluation data never reaches pre-training: the default rules by behaviour, the validation
part carved from train, one split shared by the evaluation, Mini and every export (and the
recorded opt-out), task sources checked against the data's rules, and the leak audit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from PIL import Image

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.splits import carve_validation
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.perceptual import phash_file
from cpia_assets.core.schema import MiniReason
from cpia_assets.core.training.exclusions import (
    DEFAULT_EXCLUSIONS,
    PAPER_TASK_SOURCES,
    Exclusions,
    ExclusionSettings,
    covers,
    held_out,
)
from cpia_assets.core.training.shards import SAMPLES_FILE
from cpia_assets.core.training.ssl.config import PretrainJob, PretrainSettings, export_identity
from cpia_assets.core.training.ssl.evaluate import Candidate, audit
from cpia_assets.core.training.ssl.tasks import load_folder_task, load_task, task_sources
from cpia_assets_tests.support.ssl_data import labelled_task, write_folder_tree, write_shards

EXAMPLES = [
    # (sub-dataset, source file, split, held out?) for the paper's three tasks, and controls
    ("cam16", "raw/cam16/testing/images/test_001.tif", "none", True),
    ("cam16", "raw/cam16/training/tumor/tumor_001.tif", "none", True),  # any slide may be a source
    ("pcam", "raw/pcam/unpacked/camelyonpatch_level_2_split_train_x/000001.png", "train", True),
    ("wbc", "raw/wbc/TestA/Basophil/95-10-4.jpg", "train", True),  # even if a split map missed it
    ("wbc", "raw/wbc/Test-A/Monocyte/96-1-2.jpg", "train", True),
    ("wbc", "raw/wbc/Train/Basophil/95-1-1.jpg", "val", True),  # the carved validation part
    ("wbc", "raw/wbc/Train/Basophil/95-1-2.jpg", "train", False),
    ("prcc", "raw/prcc/type1/TCGA-2K-A9WE_1.jpg", "train", True),
    ("tcga-kirp", "raw/tcga-kirp/TCGA-2K-A9WE-01Z-00-DX1.svs", "none", True),
    ("tcga-brca", "raw/tcga-brca/TCGA-A2-A0EY-01Z-00-DX1.svs", "none", False),
]


def _held(exclusions: Exclusions) -> list[bool]:
    catalog = load_catalog("cpia")
    results = []
    for key, source, split, _ in EXAMPLES:
        row = {"source_file": source, "image_name": Path(source).stem, "scale": "M", "split": split}
        results.append(bool(held_out(catalog.get(key), [row], exclusions)))
    return results


def test_the_default_rules_hold_out_every_source_of_the_papers_tasks() -> None:
    assert _held(Exclusions.load(ExclusionSettings())) == [held for *_, held in EXAMPLES]
    for dropped in DEFAULT_EXCLUSIONS:  # each default rule is needed by some example
        rules = tuple(rule for rule in DEFAULT_EXCLUSIONS if rule != dropped)
        assert _held(Exclusions.load(ExclusionSettings(rules=rules))) != [
            held for *_, held in EXAMPLES
        ], dropped
    assert {task: task_sources(task.lower(), {}) for task in PAPER_TASK_SOURCES} == dict(
        PAPER_TASK_SOURCES
    )
    assert task_sources("CAM16", {"CAM16": ["cam16:*test_*"]}) == ("cam16:*test_*",)


def test_a_validation_part_is_carved_from_train_only_where_none_is_given() -> None:
    rows = [(f"Train/{label}/{n}.jpg", label, "train") for label in "ab" for n in range(12)]
    rows += [(f"TestA/{label}/{n}.jpg", label, "test") for label in "ab" for n in range(5)]
    splits = carve_validation(rows)
    carved = sorted(path for path, split in splits.items() if split == "val")
    assert [path.split("/")[1] for path in carved] == ["a", "a", "b", "b"]  # 10:2 per class
    assert all(path.startswith("Train/") for path in carved)
    assert carve_validation(reversed(rows)) == splits  # the listing order does not matter
    with_val = [*rows, ("Val/a/0.jpg", "a", "val")]
    assert carve_validation(with_val) == {path: split for path, _, split in with_val}


def test_task_sources_must_be_held_out_by_the_datas_rules() -> None:
    assert covers(["cam16", "wbc:*TestA/*"], ["cam16:*test_*", "wbc:*TestA/*"]) == []
    assert covers(["cam16:*test_*"], ["cam16"]) == ["cam16"]  # part of it is not everything
    assert covers(["tcga-*"], ["tcga-kirp", "prcc"]) == ["prcc"]


def _stems(paths: list[str]) -> set[str]:
    return {Path(path).stem for path in paths}


def test_a_catalog_task_uses_the_split_mini_and_every_export_hold_out(small_build) -> None:
    layout, catalog = small_build["layout"], small_build["catalog"]
    task = load_task("cells", "roi-cells", layout=layout, catalog=catalog)
    records = pl.read_parquet(layout.manifest_file("roi-cells", "tiles"))
    evaluated = records.filter(pl.col("split").is_in(["val", "test"]))
    assert {layout.relative(path) for path in task.evaluation_images} == set(evaluated["path"])
    assert {layout.relative(path) for path, _ in task.splits["train"]} == set(
        records.filter(pl.col("split") == "train")["path"]
    )
    assert set(task.hashes) >= set(task.evaluation_images)  # stored when the image was written
    selection = pl.read_parquet(layout.manifest_file("roi-cells", "mini_selection"))
    reasons = dict(zip(selection["image_name"], selection["mini_reason"], strict=True))
    assert {reasons[name] for name in evaluated["image_name"]} == {MiniReason.EVAL_SPLIT}
    for variant in ("cpia-mini", "cpia-s"):
        samples = pl.read_parquet(layout.shards_dir(variant) / SAMPLES_FILE)
        cells = _stems(samples.filter(pl.col("subdataset") == "roi-cells")["path"].to_list())
        assert cells and not cells & set(evaluated["image_name"]), variant
        index = json.loads((layout.shards_dir(variant) / "index.json").read_text())
        assert index["held_out"]["applied"] and index["held_out"]["rules"] == list(
            DEFAULT_EXCLUSIONS
        )
    index = json.loads((layout.shards_dir("cpia-s") / "index.json").read_text())
    s_evaluated = evaluated.filter(pl.col("scale") == "S").height
    assert index["held_out"]["images"][MiniReason.EVAL_SPLIT] == s_evaluated


def test_an_export_without_exclusions_says_so(copy_of_small_build) -> None:
    layout = copy_of_small_build["layout"]
    config = {"shard_size": 64, "apply_exclusions": False}
    result = copy_of_small_build["job"].execute_in_process(
        partition_key="cpia-s",
        asset_selection=[dg.AssetKey("training_shards")],
        instance=copy_of_small_build["instance"],
        run_config={"ops": {"training_shards": {"config": config}}},
    )
    _, held = export_identity(layout.shards_dir("cpia-s"))
    assert held == {"applied": False, "rules": [], "images": {}}
    metadata = result.asset_materializations_for_node("training_shards")[0].metadata
    assert metadata["held_out_for_evaluation"].value == held
    samples = pl.read_parquet(layout.shards_dir("cpia-s") / SAMPLES_FILE)
    records = pl.read_parquet(layout.manifest_file("roi-cells", "tiles"))
    evaluated = set(records.filter(pl.col("split").is_in(["val", "test"]))["image_name"])
    assert evaluated <= _stems(samples["path"].to_list())


def test_a_folder_inside_a_sub_datasets_source_is_refused(small_build) -> None:
    layout, catalog = small_build["layout"], small_build["catalog"]
    with pytest.raises(ValueError, match="lies in the source of sub-dataset 'roi-cells'"):
        load_task("cells", str(layout.raw_dir("roi-cells")), layout=layout, catalog=catalog)


def _trained_on(layout: DataLayout, *, rules: list[str]) -> Candidate:
    shards = layout.shards_dir("cpia-mini")
    write_shards(layout.mini_dir, shards, shard_size=4)
    fingerprint, held = export_identity(shards)
    job = PretrainJob("mae", "cpia-mini", str(shards), ("L", "M", "S"), str(layout.root / "out"),
                      PretrainSettings(), fingerprint, held | {"rules": rules})  # fmt: skip
    return Candidate("random", "MAE", "CPIA-Mini", job.settings.model, Path("encoder.pth"), job)


def test_the_leak_audit_finds_a_planted_near_duplicate(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "data")
    write_folder_tree(layout.mini_dir, per_scale=4)
    cells = labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1})
    task = load_folder_task("cells", cells)
    task.sources = ("cam16",)
    task.hashes = {path: phash_file(path) for path in task.evaluation_images}
    clean = audit(task, _trained_on(layout, rules=["cam16"]), max_distance=4)
    assert (clean.leaks, clean.sources_not_held_out, clean.problem) == (0, [], None)
    # A test image re-encoded at another quality into the pre-training data, as a copy would be.
    test_image = task.splits["test"][0][0]
    planted = layout.mini_dir / "M" / "demo-0" / "tile-M-planted.jpg"
    Image.open(test_image).convert("RGB").save(planted, quality=70)
    shutil.rmtree(layout.shards_dir("cpia-mini"))
    leaky = audit(task, _trained_on(layout, rules=["pcam"]), max_distance=4)
    assert (leaky.leaks, leaky.sources_not_held_out) == (1, ["cam16"])
    # Data re-exported after training cannot be audited against: the row says so.
    stale = _trained_on(layout, rules=["cam16"])
    index_file = layout.shards_dir("cpia-mini") / "index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(index | {"fingerprint": "another export"}))
    assert audit(task, stale, max_distance=4).leaks is None
