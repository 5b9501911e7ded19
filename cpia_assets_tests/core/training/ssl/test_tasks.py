"""Loading a labelled task: split folders in any case and spelling, ambiguous layouts refused,
truncated images (which pass PIL's `verify()`) listed and left out, folder and catalog tasks."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.ssl.tasks import load_folder_task, load_task
from cpia_assets_tests.support.ssl_data import labelled_task


def truncate(path: Path) -> None:
    """Cut an image file in half: `verify()` still passes, decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        image.verify()


@pytest.mark.parametrize(
    ("train", "val", "test"),
    [("Train", "Val", "Test"), ("TRAIN", "validation", "testing"), ("training", "valid", "test")],
)
def test_split_folders_are_recognised_in_any_case_and_spelling(
    tmp_path: Path, train: str, val: str, test: str
) -> None:
    root = labelled_task(tmp_path / "cells", {"train": 4, "val": 1, "test": 2})
    for split, name in (("train", train), ("val", val), ("test", test)):
        (root / split).rename(root / f"{split}-renaming")
        (root / f"{split}-renaming").rename(root / name)
    task = load_folder_task("cells", root)
    assert task.classes == ["lymphocyte", "neutrophil"]
    assert {split: len(items) for split, items in task.splits.items()} == {
        "train": 8, "val": 2, "test": 4,
    }  # fmt: skip
    folder_of = {"train": train, "val": val, "test": test}
    assert all(path.parts[-3] == folder_of[split]
               for split, items in task.splits.items() for path, _ in items)  # fmt: skip


@pytest.mark.parametrize(
    ("folders", "found"),
    [
        (("train", "val"), "split folders ['train', 'val'] without both train and test"),
        (("Train", "lymphocyte"), "split folders ['Train'] beside other folders ['lymphocyte']"),
        (
            ("train", "test", "val", "valid"),
            "several folders for one split: ['test', 'train', 'val', 'valid']",
        ),
    ],
)
def test_an_ambiguous_layout_is_refused_naming_the_folder_and_what_was_found(
    tmp_path: Path, folders: tuple[str, ...], found: str
) -> None:
    source = labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1})
    root = tmp_path / "task"
    for number, name in enumerate(folders):
        shutil.copytree(source / ("train", "val", "test")[number % 3], root / name)
    with pytest.raises(ValueError) as caught:
        load_folder_task("cells", root)
    assert f"task 'cells': {root} has an ambiguous layout, {found};" in str(caught.value)


def test_a_truncated_image_of_a_folder_task_is_listed_and_left_out(tmp_path: Path) -> None:
    root = labelled_task(tmp_path / "cells", {"train": 4, "val": 1, "test": 2})
    bad = sorted((root / "train" / "lymphocyte").iterdir())[0]
    truncate(bad)
    task = load_folder_task("cells", root)
    assert [f["file"] for f in task.failures] == [str(bad)]
    assert "truncated" in task.failures[0]["reason"]
    assert bad not in [path for path, _ in task.splits["train"]]
    assert len(task.splits["train"]) == 7


def test_a_truncated_image_of_a_catalog_task_is_listed_and_left_out(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "data")
    source = labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1})
    rows = []
    for path in sorted(source.rglob("*.*")):
        stored = layout.root / "cpia" / path.relative_to(source)
        stored.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, stored)
        split, label = path.parts[-3:-1]
        rows.append({"path": layout.relative(stored), "label": label, "split": split})
    records = layout.manifest_file("demo-roi-cells", "tiles")
    records.parent.mkdir(parents=True)
    pl.DataFrame(rows).write_parquet(records)
    bad = next(layout.root / row["path"] for row in rows if row["path"].endswith(".jpg"))
    truncate(bad)
    task = load_task("cells", "demo-roi-cells", layout=layout, catalog=load_catalog("demo"))
    assert [f["file"] for f in task.failures] == [str(bad)]
    assert bad not in [path for items in task.splits.values() for path, _ in items]
    assert sum(map(len, task.splits.values())) == len(rows) - 1
