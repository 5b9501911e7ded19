"""The kNN monitor: which images it takes (train and val, never test, at most max_images), a
monitored CPU run that records the curve, continues it after a resume and trains exactly as an
unmonitored one, and the curve in ssl_checkpoint's metadata."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import torch
from torch.utils.data import DataLoader

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.ssl.augment import eval_transform
from cpia_assets.core.training.ssl.common import create_encoder
from cpia_assets.core.training.ssl.config import (
    LAST_CHECKPOINT,
    SUMMARY_FILE,
    MonitorSettings,
    PretrainJob,
)
from cpia_assets.core.training.ssl.evaluate import LabelledImages
from cpia_assets.core.training.ssl.monitor import (
    KNN_CURVE_FILE,
    MONITOR_FILE,
    KnnMonitor,
    monitor_tasks,
    save_monitor_tasks,
)
from cpia_assets.core.training.ssl.probe import extract_features, knn_predict
from cpia_assets.core.training.ssl.train import run_training
from cpia_assets.definitions import build_definitions
from cpia_assets_tests.support.ssl_data import (
    Interrupt,
    InterruptAt,
    built_catalog_task,
    labelled_task,
    tiny_settings,
    write_folder_tree,
    write_shards,
)

torch.set_num_threads(1)  # the test machine's cores are shared
CATALOG = load_catalog("demo")


def test_default_tasks_are_the_built_labelled_sets_train_and_val_only(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    per_class = {"train": 6, "val": 2, "test": 2}
    rows = built_catalog_task(layout, "demo-roi-cells", per_class)
    split_of = {str(layout.root / row["path"]): row["split"] for row in rows}
    settings = MonitorSettings(every=5, max_images=4)
    tasks, left_out = monitor_tasks(settings, catalog=CATALOG, layout=layout, seed=0)
    assert list(tasks) == ["demo-roi-cells"] and tasks["demo-roi-cells"]["classes"] == [
        "lymphocyte", "neutrophil",
    ]  # fmt: skip
    assert [reason.split(":")[0] for reason in left_out] == ["demo-roi-tissue"]  # not built
    cells = tasks["demo-roi-cells"]
    assert {split_of[path] for path, _ in cells["train"]} == {"train"}
    assert len(cells["train"]) == 4  # 12 train images, at most max_images
    assert sorted(path for path, _ in cells["val"]) == sorted(
        path for path, split in split_of.items() if split == "val"
    )  # all 4 val images
    assert "test" not in cells and "test" not in {split_of[p] for p, _ in cells["train"]}
    assert monitor_tasks(MonitorSettings(), catalog=CATALOG, layout=layout, seed=0) == ({}, [])
    with pytest.raises(ValueError, match=r"monitor\.tasks: task 'gone'"):
        missing = MonitorSettings(every=5, tasks={"gone": str(tmp_path / "nowhere")})
        monitor_tasks(missing, catalog=CATALOG, layout=layout, seed=0)


def test_an_evaluation_leaves_the_random_state_and_the_train_mode_alone(tmp_path: Path) -> None:
    cells = labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1})
    tasks, _ = monitor_tasks(MonitorSettings(every=5, tasks={"cells": str(cells)}),
                             catalog=CATALOG, layout=DataLayout(tmp_path), seed=0)  # fmt: skip
    encoder = create_encoder("vit_tiny_patch16_224", 32).train()
    lines: list[str] = []
    monitor = KnnMonitor(tasks, encoder=lambda: encoder, every=5, image_size=32, batch_size=4,
                         progress=lines.append)  # fmt: skip
    trainer = SimpleNamespace(global_step=5, max_steps=12, is_global_zero=True)
    state = torch.get_rng_state()
    monitor.on_train_batch_end(trainer, None, None, None, 0)  # type: ignore[arg-type]
    monitor.on_train_batch_end(trainer, None, None, None, 1)  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), state)  # the loader's seed came from a fork
    assert encoder.training
    assert [row["step"] for row in monitor.history] == [5] and len(lines) == 1  # once per step
    assert 0 <= monitor.history[0]["tasks"]["cells"] <= 1


def test_a_monitored_run_records_the_curve_and_trains_the_same_weights(tmp_path: Path) -> None:
    mini = tmp_path / "cpia-mini"
    write_folder_tree(mini, per_scale=4)
    cells = labelled_task(tmp_path / "cells", {"train": 4, "val": 2, "test": 2})
    monitor = MonitorSettings(every=5, tasks={"cells": str(cells)})
    settings = tiny_settings(steps=12, checkpoint_every=6, monitor=monitor)
    plain = PretrainJob("mae", "cpia-mini", str(mini), ("L", "M", "S"), str(tmp_path / "plain"),
                        replace(settings, monitor=MonitorSettings()))  # fmt: skip
    run_training(plain, log_every=100)
    watched = replace(plain, out_dir=str(tmp_path / "watched"), settings=settings)
    tasks, _ = monitor_tasks(monitor, catalog=CATALOG, layout=DataLayout(tmp_path), seed=0)
    save_monitor_tasks(Path(watched.out_dir), tasks)
    with pytest.raises(Interrupt):
        run_training(watched, callbacks=[InterruptAt(7)], log_every=100)
    lines: list[str] = []
    summary = run_training(watched, progress=lines.append, log_every=100)  # resumed at step 6
    assert summary is not None

    def weights(job: PretrainJob) -> dict[str, torch.Tensor]:
        return torch.load(Path(job.out_dir) / LAST_CHECKPOINT, weights_only=False)["state_dict"]

    ours, theirs = weights(plain), weights(watched)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # monitoring changes no training
    out = Path(watched.out_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    monitored = [row for row in rows if "knn_accuracy" in row]
    assert [row["step"] for row in monitored] == [5, 10, 12]  # every 5 and the last, once each
    assert json.loads((out / SUMMARY_FILE).read_text())["knn_accuracy"] == [
        {key: row[key] for key in ("step", "knn_accuracy", "tasks")} for row in monitored
    ]
    assert [line.split(":")[0] for line in lines if "kNN" in line] == ["step 10", "step 12"]
    assert (out / KNN_CURVE_FILE).read_bytes()[:4] == b"\x89PNG"
    encoder = create_encoder("vit_tiny_patch16_224", 64, weights=out / "encoder.pth")
    bank, queries = (
        extract_features(encoder, DataLoader(LabelledImages(
            [(Path(path), label) for path, label in tasks["cells"][split]], eval_transform(64)
        ), batch_size=8))
        for split in ("train", "val")
    )  # fmt: skip
    expected = (knn_predict(bank, queries.values, 2) == queries.labels).float().mean().item()
    assert monitored[-1]["tasks"] == {"cells": pytest.approx(expected)}
    assert monitored[-1]["knn_accuracy"] == pytest.approx(expected)
    assert MONITOR_FILE in {path.name for path in out.iterdir()}


def test_ssl_checkpoint_monitors_the_catalogs_labelled_sets_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training child: the cores are shared
    layout = DataLayout(tmp_path)
    write_folder_tree(layout.mini_dir, per_scale=4)
    write_shards(layout.mini_dir, layout.shards_dir("cpia-mini"), shard_size=4)
    built_catalog_task(layout, "demo-roi-cells", {"train": 3, "val": 1, "test": 1})
    settings = {"model": "vit_tiny_patch16_224", "image_size": 64, "batch_size": 8, "steps": 4,
                "warmup_steps": 1, "workers": 0, "checkpoint_every": 2, "monitor": {"every": 2},
                "mae": {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2}}  # fmt: skip
    result = build_definitions(CATALOG, tmp_path).resolve_implicit_global_asset_job_def()
    run = result.execute_in_process(
        asset_selection=[dg.AssetKey("ssl_checkpoint")],
        partition_key=dg.MultiPartitionKey({"method": "mae", "data": "cpia-mini"}),
        run_config={"ops": {"ssl_checkpoint": {"config": settings}}},
    )
    metadata = run.asset_materializations_for_node("ssl_checkpoint")[0].metadata
    summary = json.loads((layout.ssl_checkpoint_dir("mae", "cpia-mini") / SUMMARY_FILE).read_text())
    assert [row["step"] for row in summary["knn_accuracy"]] == [2, 4]
    assert list(summary["knn_accuracy"][-1]["tasks"]) == ["demo-roi-cells"]
    assert metadata["knn_accuracy"].value == summary["knn_accuracy"][-1]["knn_accuracy"]
    assert "data:image/jpeg;base64," in metadata["knn_curve"].value
