"""kNN accuracy of the encoder while it pre-trains: a curve beside the loss that says whether the
features are getting useful for pathology, long before the downstream evaluation.

The asset resolves the labelled tasks (the catalog and the layout live there) and writes, in the
run folder, `MONITOR_FILE`: each task's classes and at most `monitor.max_images` of its train and
of its val images (a seeded choice), never a test image. The training process's rank 0 then
evaluates the current encoder every `monitor.every` optimizer steps and at the last one (kNN as
`probe.knn_predict`: train part as memory bank, val part as queries), leaving the random state
of training untouched, so a monitored run trains exactly as an unmonitored one. The history is
kept in the checkpoints: a resumed run continues the curve.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from cpia_assets.core.catalog.model import Catalog
from cpia_assets.core.fsutil import atomic_path
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.ssl.augment import eval_transform
from cpia_assets.core.training.ssl.config import MonitorSettings, PretrainJob
from cpia_assets.core.training.ssl.evaluate import LabelledImages
from cpia_assets.core.training.ssl.probe import extract_features, knn_predict
from cpia_assets.core.training.ssl.tasks import load_task

MONITOR_FILE = "monitor_tasks.json"
KNN_CURVE_FILE = "knn_curve.png"
MONITOR_SPLITS = ("train", "val")  # memory bank and queries; the test part stays unseen

MonitorTask = dict[str, Any]
"""`classes` and, per split of `MONITOR_SPLITS`, a list of [image path, class index]."""


def monitor_tasks(
    settings: MonitorSettings, *, catalog: Catalog, layout: DataLayout, seed: int
) -> tuple[dict[str, MonitorTask], list[str]]:
    """The monitored tasks (empty when monitoring is off) and why default ones were left out.
    A configured task that cannot load raises; a default one (a labelled ROI set of the
    catalog with a split rule) whose records are not built, or that cannot load, is left out."""
    if not settings.every:
        return {}, []
    configured = bool(settings.tasks)
    origins = settings.tasks or {
        entry.key: entry.key
        for entry in catalog.subdatasets
        if entry.kind == "roi" and entry.labelled and entry.splits is not None
    }
    tasks: dict[str, MonitorTask] = {}
    skipped: list[str] = []
    for name, origin in origins.items():
        try:
            task = load_task(name, origin, layout=layout, catalog=catalog, seed=seed)
        except (OSError, ValueError) as exc:
            if configured:
                raise ValueError(f"monitor.tasks: {exc}") from exc
            skipped.append(f"{name}: {exc}")
            continue
        rng = random.Random(seed)
        tasks[name] = {"classes": task.classes} | {
            split: [[str(path), label] for path, label in _at_most(task.splits[split],
                                                                   settings.max_images, rng)]
            for split in MONITOR_SPLITS
        }  # fmt: skip
    return tasks, skipped


def _at_most(items: list[Any], count: int, rng: random.Random) -> list[Any]:
    """A seeded choice of `count` items in their order (all when there are no more)."""
    if len(items) <= count:
        return items
    return [items[i] for i in sorted(rng.sample(range(len(items)), count))]


def save_monitor_tasks(out: Path, tasks: dict[str, MonitorTask]) -> None:
    """Write the tasks for the training process, or remove an earlier run's when there are none."""
    path = out / MONITOR_FILE
    if not tasks:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"tasks": tasks}))


def knn_monitor(
    job: PretrainJob, encoder: Callable[[], nn.Module], progress: Callable[[str], None]
) -> KnnMonitor | None:
    """The callback for `job`, or None when monitoring is off or has no task (said why)."""
    every = job.settings.monitor.every
    path = Path(job.out_dir) / MONITOR_FILE
    if not every:
        return None
    if not path.is_file():
        progress(f"no kNN monitoring: {path} is missing (ssl_checkpoint writes it when "
                 "monitor.tasks or the catalog's labelled sets give a task)")  # fmt: skip
        return None
    tasks = json.loads(path.read_text())["tasks"]
    return KnnMonitor(tasks, encoder=encoder, every=every, image_size=job.settings.image_size,
                      batch_size=job.settings.batch_size, progress=progress)  # fmt: skip


class KnnMonitor(pl.Callback):
    """kNN accuracy of `encoder()` on each task, every `every` optimizer steps and at the last,
    on global rank 0; `history` rows are {step, knn_accuracy (mean over tasks), tasks}."""

    def __init__(
        self,
        tasks: dict[str, MonitorTask],
        *,
        encoder: Callable[[], nn.Module],
        every: int,
        image_size: int,
        batch_size: int,
        progress: Callable[[str], None],
    ) -> None:
        self.tasks = tasks
        self.encoder = encoder
        self.every = every
        self.transform = eval_transform(image_size)
        self.batch_size = batch_size
        self.progress = progress
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        step = trainer.global_step
        due = step > 0 and (step % self.every == 0 or step == trainer.max_steps)
        done = bool(self.history) and self.history[-1]["step"] >= step  # accumulating, resumed
        if not trainer.is_global_zero or not due or done:
            return
        encoder = self.encoder()
        training = encoder.training
        with torch.random.fork_rng(devices=[]):  # the loader draws a seed: keep training's
            scores = {name: self._accuracy(encoder, task) for name, task in self.tasks.items()}
        encoder.train(training)
        mean = sum(scores.values()) / len(scores)
        self.history.append({"step": step, "knn_accuracy": mean, "tasks": scores})
        each = ", ".join(f"{name} {value:.3f}" for name, value in scores.items())
        self.progress(f"step {step}: kNN accuracy {mean:.3f} ({each})")

    def _accuracy(self, encoder: nn.Module, task: MonitorTask) -> float:
        bank, queries = (
            extract_features(encoder, DataLoader(
                LabelledImages([(Path(p), label) for p, label in task[split]], self.transform),
                batch_size=self.batch_size,
            ))
            for split in MONITOR_SPLITS
        )  # fmt: skip
        predicted = knn_predict(bank, queries.values, len(task["classes"]))
        return float((predicted == queries.labels).float().mean())
