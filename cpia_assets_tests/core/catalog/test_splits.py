"""The declared seeded stratified split (7:1:2 per class, as the paper splits pRCC and CAM16)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpia_assets.core.catalog.splits import stratified_split
from cpia_assets.core.layout import DataLayout
from cpia_assets_tests.core.roi.test_roi import KEY, roi_entry, run


def _images(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{label}/img-{index:04d}.png", label) for label, n in counts.items()
            for index in range(n)]  # fmt: skip


def test_each_class_is_split_7_1_2():
    images = _images({"type1": 870, "type2": 547})  # pRCC's classes
    splits = stratified_split(images, seed=0)
    per_class = Counter((label, splits[path]) for path, label in images)
    assert per_class == {
        ("type1", "train"): 609, ("type1", "val"): 87, ("type1", "test"): 174,
        ("type2", "train"): 383, ("type2", "val"): 55, ("type2", "test"): 109,
    }  # fmt: skip


def test_split_depends_on_seed_and_paths_only():
    images = _images({"a": 50, "b": 30})
    first = stratified_split(images, seed=3)
    assert stratified_split(list(reversed(images)), seed=3) == first
    assert stratified_split(images, seed=4) != first
    # Adding images of another class moves no image of the existing classes.
    more = stratified_split([*images, *_images({"c": 20})], seed=3)
    assert {path: more[path] for path in first} == first
    # The test images are spread over the class, not its first paths.
    tests = sorted(path for path, split in first.items() if split == "test" and "a/" in path)
    assert tests != [f"a/img-{index:04d}.png" for index in range(len(tests))]


def test_tiny_classes_and_custom_ratios():
    splits = stratified_split([("x.png", "rare"), ("y.png", None)], seed=0)
    assert splits == {"x.png": "train", "y.png": "train"}
    three = stratified_split(_images({"c": 3}), ratios={"train": 1, "test": 1, "val": 1})
    assert sorted(three.values()) == ["test", "train", "val"]
    halves = stratified_split(_images({"c": 10}), ratios={"train": 1, "test": 1})
    assert Counter(halves.values()) == {"train": 5, "test": 5}


@pytest.mark.parametrize("ratios", [{"train": 7, "dev": 3}, {"train": 0}, {"train": -1, "test": 2}])
def test_bad_ratios_are_refused(ratios):
    with pytest.raises(ValueError, match="ratios"):
        stratified_split(_images({"a": 3}), ratios=ratios)


def test_roi_partition_applies_the_declared_split(tmp_path: Path):
    layout = DataLayout(tmp_path / "data")
    for label, count in (("type1", 10), ("type2", 20)):
        for index in range(count):
            path = layout.raw_dir(KEY) / label / f"{label}-{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 40, 3), (200, 90, 140), np.uint8)).save(path)
    entry = roi_entry(
        labelled=True,
        labels={"from": "parent_folder", "level": 1},
        splits={"from": "stratified", "ratios": {"train": 7, "val": 1, "test": 2}, "seed": 1},
    )
    result = run(entry, layout)
    assert not result.failures
    per_class = Counter((row["label"], row["split"]) for row in result.records)
    assert per_class == {
        ("type1", "train"): 7, ("type1", "val"): 1, ("type1", "test"): 2,
        ("type2", "train"): 14, ("type2", "val"): 2, ("type2", "test"): 4,
    }  # fmt: skip
    expected = stratified_split(
        [(f"{row['label']}/{row['image_name']}.png", row["label"]) for row in result.records],
        seed=1,
    )
    assert {f"{row['label']}/{row['image_name']}.png": row["split"]
            for row in result.records} == expected  # fmt: skip
