"""Downstream evaluation: splits, metrics, a short fine-tune on a labelled ROI set, Table II."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.ssl.config import (
    ENCODER_FILE,
    FinetuneSettings,
    PretrainJob,
    PretrainSettings,
    prepare_run_dir,
)
from cpia_assets.core.training.ssl.evaluate import (
    accuracy_and_macro_f1,
    candidates,
    confusion_matrix,
    finetune,
    load_task,
    table_ii_markdown,
)
from cpia_assets_tests.support.ssl_data import corrupt_jpeg, labelled_task, write_folder_tree

torch.set_num_threads(1)  # the test machine's cores are shared


def test_given_splits_are_kept_and_unreadable_images_reported(tmp_path: Path) -> None:
    root = labelled_task(tmp_path / "cells", {"train": 4, "val": 1, "test": 2})
    bad = sorted((root / "test" / "neutrophil").iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    task = load_task("cells", root)
    assert task.classes == ["lymphocyte", "neutrophil"]
    assert {split: len(items) for split, items in task.splits.items()} == {
        "train": 8, "val": 2, "test": 3,
    }  # fmt: skip
    assert all(path.parts[-3] == "test" for path, _ in task.splits["test"])
    assert [f["file"] for f in task.failures] == [str(bad)]


def test_class_folders_are_split_7_1_2_per_class_with_a_seed(tmp_path: Path) -> None:
    for label, count in (("tumour", 20), ("normal", 10)):
        write_folder_tree(tmp_path / "scratch" / label, per_scale=count // 4 + 1)
        images = sorted((tmp_path / "scratch" / label).rglob("*.jpg"))[:count]
        (tmp_path / "task" / label).mkdir(parents=True)
        for number, image in enumerate(images):
            image.rename(tmp_path / "task" / label / f"{number}.jpg")
    task = load_task("tissue", tmp_path / "task", seed=1)
    counts = {split: [label for _, label in items] for split, items in task.splits.items()}
    assert {split: (labels.count(0), labels.count(1)) for split, labels in counts.items()} == {
        "train": (7, 14), "val": (1, 2), "test": (2, 4),
    }  # fmt: skip  # classes sorted: normal (10), tumour (20)
    again = load_task("tissue", tmp_path / "task", seed=1)
    assert again.splits == task.splits
    assert load_task("tissue", tmp_path / "task", seed=2).splits != task.splits


def test_bad_tasks_fail_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere is not a folder"):
        load_task("x", tmp_path / "nowhere")
    (tmp_path / "one" / "only-class").mkdir(parents=True)
    write_folder_tree(tmp_path / "one" / "only-class", per_scale=1)
    with pytest.raises(ValueError, match="one has fewer than two class folders"):
        load_task("x", tmp_path / "one")


def test_metrics() -> None:
    matrix = confusion_matrix([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0], 3)
    assert matrix == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    accuracy, macro_f1 = accuracy_and_macro_f1(matrix)
    assert accuracy == pytest.approx(4 / 6)
    assert macro_f1 == pytest.approx((2 * 2 / (3 + 3) + 2 * 2 / (3 + 2) + 0) / 3)


def test_short_finetune_reports_accuracy_f1_and_confusion(tmp_path: Path) -> None:
    root = labelled_task(tmp_path / "cells", {"train": 6, "val": 2, "test": 3})
    corrupt_jpeg(next((root / "train" / "lymphocyte").glob("*.jpg")))
    task = load_task("cells", root)
    settings = FinetuneSettings(epochs=2, batch_size=4, image_size=32, workers=0, lr=1e-3)
    lines: list[str] = []
    result = finetune(task, model="vit_tiny_patch16_224", weights=None, settings=settings,
                      progress=lines.append)  # fmt: skip
    assert sum(map(sum, result["confusion"])) == 6
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
    correct = sum(result["confusion"][k][k] for k in range(2))
    assert result["accuracy"] == pytest.approx(correct / 6)
    assert result["best_epoch"] in (1, 2) and len(lines) == 2
    assert result["images"] == {"train": 11, "val": 4, "test": 6}
    assert len(result["unreadable"]) == 1


def test_table_ii_lists_our_rows_beside_the_paper() -> None:
    rows = [{"init": "random", "method": "MAE", "data": "CPIA-Mini", "task": "cells",
             "accuracy": 0.75, "macro_f1": 0.5}]  # fmt: skip
    table = table_ii_markdown(rows).splitlines()
    assert table[0] == "| source | init | method | data | cells | WBC | pRCC | CAM16 |"
    assert "| ours | random | MAE | CPIA-Mini | 75.00 (50.00) |  |  |  |" in table
    paper_row = "| paper | random | MAE | CPIA |  | 97.58 (95.83) | 92.58 (91.94) | 93.98 (93.98) |"
    assert paper_row in table
    assert len(table) == 2 + 1 + 9


def test_candidates_are_every_encoder_plus_the_baseline_rows(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    imagenet = tmp_path / "imagenet.pth"
    imagenet.write_bytes(b"weights")
    for method, data, init in (("mae", "cpia-s", str(imagenet)), ("dino", "cpia", "random")):
        settings = PretrainSettings(init=init)
        out = layout.ssl_checkpoint_dir(method, data, settings.init_label)
        prepare_run_dir(PretrainJob(method, data, str(tmp_path), ("S",), str(out), settings))
        (out / ENCODER_FILE).write_bytes(b"encoder")
    unfinished = layout.ssl_checkpoint_dir("mocov3", "cpia-l")
    prepare_run_dir(PretrainJob("mocov3", "cpia-l", str(tmp_path), ("L",), str(unfinished),
                                PretrainSettings()))  # fmt: skip
    rows = candidates(layout, FinetuneSettings(imagenet_init=str(imagenet)))
    assert [(c.init, c.method, c.data, c.weights is not None) for c in rows] == [
        ("random", "DINO", "CPIA", True),
        ("ImageNet", "MAE", "CPIA-S", True),  # its own folder: mae__cpia-s__imagenet
        ("random", "none", "none", False),
        ("ImageNet", "none", "none", True),
    ]
