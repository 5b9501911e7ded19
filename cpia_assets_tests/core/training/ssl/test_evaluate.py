"""Downstream evaluation: folder tasks' splits, metrics, a short fine-tune on a labelled ROI set,
the best epoch chosen on validation, result reuse, encoder labels, Table II."""

from __future__ import annotations

import itertools
import math
import re
import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.ssl import evaluate
from cpia_assets.core.training.ssl.config import (
    ENCODER_FILE,
    ENCODER_JOB_FILE,
    FinetuneSettings,
    PretrainJob,
    PretrainSettings,
    prepare_run_dir,
)
from cpia_assets.core.training.ssl.evaluate import (
    Candidate,
    Finetuning,
    accuracy_and_macro_f1,
    candidates,
    confusion_matrix,
    finetune,
    finetuning,
    result_fingerprint,
)
from cpia_assets.core.training.ssl.table import table_ii_markdown
from cpia_assets.core.training.ssl.tasks import load_folder_task as load_task
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


def test_given_splits_without_val_carve_it_from_train_the_same_way_every_time(
    tmp_path: Path,
) -> None:
    root = labelled_task(tmp_path / "cells", {"train": 12, "test": 3})
    task = load_task("cells", root)
    counts = {split: len(items) for split, items in task.splits.items()}
    assert counts == {"train": 20, "val": 4, "test": 6}  # 10:2 of each class's 12
    assert all(path.parts[-3] == "train" for path, _ in task.splits["val"])
    assert load_task("cells", root).splits == task.splits


def _spy_on_splits(monkeypatch: pytest.MonkeyPatch, accuracies: dict[str, list[float]]) -> list:
    """Replace the per-split evaluation by one returning the given accuracies in turn (a
    2-class confusion matrix of 100 images), and record which split each call read."""
    read: list[str] = []

    def confusion(network: object, task: object, split: str, settings: object) -> list:
        read.append(split)
        correct = round(100 * accuracies[split][len([s for s in read if s == split]) - 1])
        return [[correct, 0], [100 - correct, 0]]

    monkeypatch.setattr(evaluate, "_confusion", confusion)
    return read


def test_the_best_epoch_is_chosen_on_validation_and_test_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = load_task("cells", labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1}))
    read = _spy_on_splits(monkeypatch, {"val": [0.2, 0.9, 0.5], "test": [0.7]})
    settings = FinetuneSettings(epochs=3, batch_size=4, image_size=32, workers=0)
    result = finetune(task, model="vit_tiny_patch16_224", weights=None, settings=settings,
                      progress=lambda line: None)  # fmt: skip
    assert read == ["val", "val", "val", "test"]
    assert (result["best_epoch"], result["val_accuracy"], result["accuracy"]) == (2, 0.9, 0.7)


def test_results_are_reused_only_when_nothing_they_depend_on_changed(tmp_path: Path) -> None:
    task = load_task("cells", labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1}))
    settings = FinetuneSettings(tasks={"cells": "x"})
    candidate = Candidate("random", "none", "none", "vit_tiny_patch16_224", None)
    base = result_fingerprint(settings, task, candidate, "random")
    changed = {"epochs": 3, "batch_size": 4, "lr": 0.5, "weight_decay": 0.1, "image_size": 32,
               "seed": 9, "workers": 1, "random_init_baseline": False, "imagenet_init": "w.pth",
               "baseline_model": "vit_small_patch16_224", "layer_decay": 0.65,
               "warmup_epochs": 0, "label_smoothing": 0.0, "drop_path": 0.2,
               "mae_global_pool": False, "bf16": False}  # fmt: skip
    assert set(changed) == {f.name for f in fields(FinetuneSettings)} - {"tasks", "task_sources"}
    for name, value in changed.items():
        other = replace(settings, **{name: value})
        assert result_fingerprint(other, task, candidate, "random") != base, name
    assert result_fingerprint(settings, task, candidate, "other bytes") != base
    moved = replace(task, splits=task.splits | {"test": task.splits["val"]})
    assert result_fingerprint(settings, moved, candidate, "random") != base
    other_task = replace(settings, tasks={"cells": "x", "more": "y"})
    assert result_fingerprint(other_task, task, candidate, "random") == base


TINY = "vit_tiny_patch16_224"


def _lr(run: Finetuning, name: str) -> float:
    parameter = dict(run.network.named_parameters())[name]
    return next(
        g["lr"] for g in run.optimizer.param_groups if any(p is parameter for p in g["params"])
    )


def test_the_lr_decays_layer_wise_from_the_head_and_warms_up_then_decays() -> None:
    settings = FinetuneSettings(image_size=32, lr=1e-3, epochs=4, warmup_epochs=1)
    run = finetuning(TINY, None, 3, settings, steps_per_epoch=5)
    depth = len(run.network.blocks)
    head, stem = [], []
    for step in range(20):
        run.schedule.step_update(step)
        head.append(_lr(run, "head.weight"))
        stem.append(_lr(run, "patch_embed.proj.weight"))
        if step == 5:  # the peak: warm-up over
            blocks = [_lr(run, f"blocks.{k}.attn.qkv.weight") for k in range(depth)]
    assert head[:6] == pytest.approx([1e-3 * step / 5 for step in range(6)])
    assert stem[5] == pytest.approx(1e-3 * 0.75 ** (depth + 1))
    assert blocks == pytest.approx([1e-3 * 0.75 ** (depth - k) for k in range(depth)])
    assert all(a > b for a, b in itertools.pairwise(head[5:]))  # cosine decay to the end
    assert head[-1] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 14 / 15)) / 2)
    ratios = [s / h for s, h in zip(stem[1:], head[1:], strict=True)]
    assert ratios == pytest.approx([0.75 ** (depth + 1)] * 19)


def test_the_loss_is_label_smoothed() -> None:
    run = finetuning(TINY, None, 3, FinetuneSettings(image_size=32), steps_per_epoch=1)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    expected = 0.0
    for row, label in zip(logits.tolist(), (0, 2), strict=True):
        log_z = math.log(sum(math.exp(x) for x in row))
        nll = [log_z - x for x in row]
        expected += (0.9 * nll[label] + 0.1 * sum(nll) / 3) / 2
    assert run.loss(logits, torch.tensor([0, 2])).item() == pytest.approx(expected)


def test_drop_path_rises_over_the_blocks_to_the_setting() -> None:
    run = finetuning(TINY, None, 3, FinetuneSettings(image_size=32), steps_per_epoch=1)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in run.network.blocks]
    depth = len(rates)
    assert rates == pytest.approx([0.1 * k / (depth - 1) for k in range(depth)])


def test_mae_encoders_are_fine_tuned_with_average_pooling_and_fc_norm(tmp_path: Path) -> None:
    encoder = tmp_path / "encoder.pth"
    state = {
        k: torch.rand_like(v) for k, v in evaluate.create_encoder(TINY, 32).state_dict().items()
    }
    torch.save(state, encoder)
    settings = FinetuneSettings(image_size=32)
    pooled = finetuning(TINY, encoder, 2, settings, steps_per_epoch=1, average_pool=True).network
    assert pooled.global_pool == "avg" and isinstance(pooled.norm, torch.nn.Identity)
    assert isinstance(pooled.fc_norm, torch.nn.LayerNorm)
    assert torch.equal(pooled.fc_norm.weight, torch.ones(192))  # fresh, as MAE's
    token = finetuning(TINY, encoder, 2, settings, steps_per_epoch=1).network
    assert token.global_pool == "token" and isinstance(token.fc_norm, torch.nn.Identity)
    assert torch.equal(token.norm.weight, state["norm.weight"])
    for network in (pooled, token):
        assert torch.equal(network.blocks[5].mlp.fc1.weight, state["blocks.5.mlp.fc1.weight"])


def test_bf16_autocast_is_on_only_on_cuda_and_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "autocast", lambda kind, dtype, enabled: (kind, dtype, enabled))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert evaluate._autocast(cuda, FinetuneSettings()) == ("cuda", torch.bfloat16, True)
    assert evaluate._autocast(cuda, FinetuneSettings(bf16=False))[2] is False
    assert evaluate._autocast(cpu, FinetuneSettings())[2] is False


def test_only_mae_candidates_get_average_pooling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = DataLayout(tmp_path / "data")
    for method in ("mae", "dino"):
        out = layout.ssl_checkpoint_dir(method, "cpia")
        job = PretrainJob(method, "cpia", str(tmp_path), ("S",), str(out),
                          PretrainSettings(model=TINY))  # fmt: skip
        prepare_run_dir(job)
        torch.save({"cls_token": torch.zeros(1, 1, 8)}, out / ENCODER_FILE)
        job.save(out / ENCODER_JOB_FILE)
    pooling: dict[str, bool] = {}

    def spy(task: object, *, model: str, weights: Path | None, settings: object,
            average_pool: bool, progress: object) -> dict:  # fmt: skip
        pooling[weights.parent.name if weights else "random"] = average_pool
        return {"task": "cells"}

    monkeypatch.setattr(evaluate, "finetune", spy)
    monkeypatch.setattr(evaluate, "frozen_evaluations", lambda *args, **kwargs: {})
    root = labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1})
    settings = FinetuneSettings(tasks={"cells": str(root)}, baseline_model=TINY)
    for mae_global_pool in (True, False):
        evaluate.evaluate_all(layout, load_catalog("demo"), replace(
            settings, mae_global_pool=mae_global_pool), progress=lambda _: None)  # fmt: skip
        assert pooling == {"mae__cpia": mae_global_pool, "dino__cpia": False, "random": False}


def test_table_ii_labels_its_cells_and_flags_leaks_and_missing_exclusions() -> None:
    row = {"init": "random", "method": "MAE", "data": "CPIA-Mini", "task": "cells",
           "accuracy": 0.75, "macro_f1": 0.5, "images": {"test": 4}, "leaks": 0,
           "sources_not_held_out": [], "exclusions_applied": True}  # fmt: skip
    leaky = row | {"data": "CPIA", "leaks": 2, "exclusions_applied": False,
                   "sources_not_held_out": ["cam16"], "knn": {"accuracy": 1.0, "macro_f1": 1.0},
                   "linear_probe": {"accuracy": 0.5, "macro_f1": 0.25}}  # fmt: skip
    table = table_ii_markdown([row, leaky], 4).splitlines()
    assert table[0].startswith("Cells: test accuracy % (macro F1 %) of fine-tuning at the epoch")
    assert "within 4 bits" in table[0] and "n: test images" in table[0]
    assert table[2] == "| source | init | method | data | cells | WBC | pRCC | CAM16 |"
    assert "| ours | random | MAE | CPIA-Mini | 75.00 (50.00) · n=4 · leaks 0 |  |  |  |" in table
    no_exclusions = (
        "| ours | random | MAE | CPIA (no exclusions) | 75.00 (50.00) · kNN 100.00 (100.00) · "
        "linear 50.00 (25.00) · n=4 · leaks 2 ! |"
    )
    assert any(line.startswith(no_exclusions) for line in table)
    paper_row = "| paper | random | MAE | CPIA |  | 97.58 (95.83) | 92.58 (91.94) | 93.98 (93.98) |"
    assert paper_row in table
    assert len(table) == 2 + 2 + 2 + 9


def test_candidates_are_every_encoder_plus_the_baseline_rows(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    imagenet = tmp_path / "imagenet.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, imagenet)  # read, not matched to a model
    for method, data, init in (("mae", "cpia-s", str(imagenet)), ("dino", "cpia", "random")):
        settings = PretrainSettings(init=init)
        out = layout.ssl_checkpoint_dir(method, data, settings.init_label)
        job = PretrainJob(method, data, str(tmp_path), ("S",), str(out), settings)
        prepare_run_dir(job)
        shutil.copy(imagenet, out / ENCODER_FILE)
        job.save(out / ENCODER_JOB_FILE)
    unfinished = layout.ssl_checkpoint_dir("mocov3", "cpia-l")
    prepare_run_dir(PretrainJob("mocov3", "cpia-l", str(tmp_path), ("L",), str(unfinished),
                                PretrainSettings()))  # fmt: skip
    rows, failures = candidates(layout, FinetuneSettings(imagenet_init=str(imagenet)))
    assert [(c.init, c.method, c.data, c.weights is not None) for c in rows] == [
        ("random", "DINO", "CPIA", True),
        ("ImageNet", "MAE", "CPIA-S", True),  # its own folder: mae__cpia-s__imagenet
        ("random", "none", "none", False),
        ("ImageNet", "none", "none", True),
    ]
    assert failures == []


def test_an_encoder_is_labelled_by_the_job_that_trained_it(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    out = layout.ssl_checkpoint_dir("mae", "cpia-s")
    trained = PretrainJob("mae", "cpia-s", str(tmp_path), ("S",), str(out),
                          PretrainSettings(model="vit_tiny_patch16_224"))  # fmt: skip
    prepare_run_dir(trained)
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, out / ENCODER_FILE)
    trained.save(out / ENCODER_JOB_FILE)
    # A newer job in the same folder (e.g. mid-run) must not relabel the finished encoder.
    newer = replace(trained, method="dino", settings=replace(trained.settings, model="vit_small"))
    newer.save(out / "config.json")
    [row, _], _ = candidates(layout, FinetuneSettings())
    assert (row.method, row.model, row.job) == ("MAE", "vit_tiny_patch16_224", trained)
    (out / ENCODER_JOB_FILE).unlink()
    rows, failures = candidates(layout, FinetuneSettings())
    assert [c.method for c in rows] == ["none"]
    assert "cannot label the encoder" in failures[0]["reason"]


def test_a_weights_file_that_is_not_a_checkpoint_is_one_failure_naming_it(tmp_path: Path) -> None:
    """Text makes torch's unpickler fail with `KeyError: 101`: not a crash, one failed row."""
    layout = DataLayout(tmp_path / "data")
    imagenet = tmp_path / "imagenet.pth"
    imagenet.write_text("hello world")
    rows, failures = candidates(layout, FinetuneSettings(imagenet_init=str(imagenet)))
    assert [(c.init, c.weights) for c in rows] == [("random", None)]
    assert failures == [
        {"file": str(imagenet),
         "reason": f"{imagenet}: cannot read the weights file (KeyError: 101)"}
    ]  # fmt: skip
    absent = tmp_path / "absent.safetensors"
    _, failures = candidates(layout, FinetuneSettings(imagenet_init=str(absent)))
    assert [f["file"] for f in failures] == [str(absent)]
    assert failures[0]["reason"].startswith(f"{absent}: cannot read the weights file")


def test_a_bad_image_and_a_bad_weights_file_fail_alone_in_a_full_evaluation(
    tmp_path: Path,
) -> None:
    layout = DataLayout(tmp_path / "data")
    root = labelled_task(tmp_path / "cells", {"train": 3, "val": 1, "test": 1})
    truncated = sorted((root / "train" / "neutrophil").glob("*.jpg"))[0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    imagenet = tmp_path / "imagenet.pth"
    imagenet.write_text("hello world")
    settings = FinetuneSettings(
        tasks={"cells": str(root), "Cells-2": str(root)}, epochs=1, batch_size=4, image_size=32,
        workers=0, imagenet_init=str(imagenet), baseline_model="vit_tiny_patch16_224",
    )  # fmt: skip
    result = evaluate.evaluate_all(layout, load_catalog("demo"), settings, progress=lambda _: None)
    assert [(row["task"], row["init"]) for row in result.rows] == [
        ("Cells-2", "random"), ("cells", "random"),
    ]  # fmt: skip
    assert all(row["images"]["train"] == 5 for row in result.rows)  # 6 less the truncated one
    assert [f["file"] for f in result.failures] == [str(imagenet), str(truncated), str(truncated)]
    assert "truncated" in result.failures[1]["reason"]
    assert (layout.ssl_eval_dir / "Cells-2" / "random__none__none.json").is_file()


def test_an_image_spoiled_after_the_task_loaded_fails_naming_the_file(tmp_path: Path) -> None:
    task = load_task("cells", labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1}))
    spoiled = next(path for path, _ in task.splits["val"] if path.suffix == ".jpg")
    spoiled.write_bytes(spoiled.read_bytes()[: spoiled.stat().st_size // 2])  # PIL: "truncated"
    settings = FinetuneSettings(epochs=1, batch_size=4, image_size=32, workers=0)
    with pytest.raises(OSError, match=rf"^{re.escape(str(spoiled))}: unreadable image"):
        finetune(task, model="vit_tiny_patch16_224", weights=None, settings=settings,
                 progress=lambda _: None)  # fmt: skip


@pytest.mark.parametrize("name", ["../../../x", "/tmp/x", "a/b", "-x", "x.y", "", "wbc\n", "ǆ"])
def test_a_task_name_that_is_not_a_folder_name_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=rf"task name {re.escape(repr(name))} must be letters"):
        FinetuneSettings(tasks={name: "wbc"})


def test_task_names_are_partition_keys_in_any_case_and_distinct_ignoring_case() -> None:
    assert list(FinetuneSettings(tasks={"WBC": "wbc", "pRCC": "prcc", "cam-16": "c"}).tasks) == [
        "WBC", "pRCC", "cam-16",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="task names 'wbc' and 'WBC' differ only in case"):
        FinetuneSettings(tasks={"wbc": "wbc", "WBC": "wbc"})
