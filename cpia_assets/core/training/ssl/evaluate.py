"""Downstream evaluation: fine-tune an encoder on a labelled ImageFolder task, keep the best epoch
on validation, report test accuracy, macro F1 and the confusion matrix (the paper's Table II)."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cpia_assets.core.fsutil import atomic_path, sha256_file
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.ssl.augment import eval_transform, finetune_transform
from cpia_assets.core.training.ssl.common import create_encoder
from cpia_assets.core.training.ssl.config import (
    DATA_NAMES,
    ENCODER_FILE,
    JOB_FILE,
    METHOD_NAMES,
    FinetuneSettings,
    PretrainJob,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # pRCC and CAM16 in the paper: 7:1:2 per class

PAPER_TASKS = ("WBC", "pRCC", "CAM16")
PUBLISHED_TABLE_II: tuple[tuple[str, ...], ...] = (
    # init, method, data, then accuracy % (macro F1 %) for each of PAPER_TASKS
    ("random", "none", "none", "91.63 (85.35)", "73.85 (71.12)", "80.09 (79.94)"),
    ("random", "MAE", "ImageNet-1k", "97.17 (95.36)", "91.17 (90.66)", "93.98 (93.98)"),
    ("random", "MAE", "CPIA", "97.58 (95.83)", "92.58 (91.94)", "93.98 (93.98)"),
    ("random", "MoCo-v3", "CPIA", "91.03 (85.70)", "73.14 (68.05)", "81.02 (80.76)"),
    ("random", "DINO", "CPIA", "91.24 (85.31)", "70.32 (62.83)", "80.09 (79.94)"),
    ("ImageNet", "MAE", "CPIA", "97.35 (95.66)", "92.23 (91.82)", "91.67 (91.65)"),
    ("ImageNet", "MAE", "CPIA-L", "97.33 (95.73)", "89.40 (88.60)", "92.59 (92.58)"),
    ("ImageNet", "MAE", "CPIA-M", "97.14 (95.12)", "89.75 (89.04)", "92.59 (92.59)"),
    ("ImageNet", "MAE", "CPIA-S", "97.49 (95.57)", "84.45 (83.28)", "92.13 (92.13)"),
)
"""The paper's Table II: init, method, data, accuracy % (F1 %) per task."""


@dataclass
class LabelledTask:
    name: str
    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    failures: list[dict[str, str]]  # unreadable images, left out: {"file", "reason"}


def load_task(name: str, root: Path, seed: int = 0) -> LabelledTask:
    """The labelled images of an ImageFolder task, split as given or 7:1:2 per class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"task {name!r}: {root} is not a folder")
    failures: list[dict[str, str]] = []
    given = (root / "train").is_dir() and (root / "test").is_dir()
    if given:
        per_split = {split: _class_images(root / split, failures) for split in SPLITS}
    else:
        per_split = _stratified(_class_images(root, failures), seed)
    if not per_split["val"]:
        per_split["train"], per_split["val"] = _carve_validation(per_split["train"], seed)
    classes = sorted({label for images in per_split.values() for label in images})
    if len(classes) < 2:
        raise ValueError(f"task {name!r}: {root} has fewer than two class folders with images")
    splits = {
        split: [(path, classes.index(label)) for label, paths in sorted(per_split[split].items())
                for path in paths]
        for split in SPLITS
    }  # fmt: skip
    empty = [split for split in SPLITS if not splits[split]]
    if empty:
        raise ValueError(f"task {name!r}: {root} has no readable images in split(s) {empty}")
    return LabelledTask(name, root, classes, splits, failures)


def _class_images(folder: Path, failures: list[dict[str, str]]) -> dict[str, list[Path]]:
    images: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return images
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                failures.append({"file": str(path), "reason": f"unreadable image: {exc}"})
                continue
            images.setdefault(class_dir.name, []).append(path)
    return images


def _stratified(images: dict[str, list[Path]], seed: int) -> dict[str, dict[str, list[Path]]]:
    splits: dict[str, dict[str, list[Path]]] = {split: {} for split in SPLITS}
    for label, paths in images.items():
        shuffled = sorted(paths)
        random.Random(f"{seed}:{label}").shuffle(shuffled)
        n_train = round(len(shuffled) * SPLIT_FRACTIONS[0])
        n_val = round(len(shuffled) * SPLIT_FRACTIONS[1])
        parts = (
            shuffled[:n_train],
            shuffled[n_train : n_train + n_val],
            shuffled[n_train + n_val :],
        )
        for split, part in zip(SPLITS, parts, strict=True):
            if part:
                splits[split][label] = part
    return splits


def _carve_validation(
    train: dict[str, list[Path]], seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Split 1/8 of every class's training images off as validation (7:1)."""
    kept, val = {}, {}
    for label, paths in train.items():
        shuffled = sorted(paths)
        random.Random(f"{seed}:val:{label}").shuffle(shuffled)
        n_val = max(1, len(shuffled) // 8) if len(shuffled) > 1 else 0
        kept[label], val[label] = shuffled[n_val:], shuffled[:n_val]
    return kept, {label: paths for label, paths in val.items() if paths}


class LabelledImages(Dataset):
    def __init__(self, items: Sequence[tuple[Path, int]], transform: Callable) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def confusion_matrix(
    truth: Sequence[int], predicted: Sequence[int], classes: int
) -> list[list[int]]:
    """Rows: true class, columns: predicted class."""
    matrix = [[0] * classes for _ in range(classes)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def accuracy_and_macro_f1(matrix: list[list[int]]) -> tuple[float, float]:
    total = sum(map(sum, matrix))
    correct = sum(matrix[k][k] for k in range(len(matrix)))
    scores = []
    for k in range(len(matrix)):
        predicted = sum(row[k] for row in matrix)
        actual = sum(matrix[k])
        scores.append(2 * matrix[k][k] / (predicted + actual) if predicted + actual else 0.0)
    return correct / total if total else 0.0, sum(scores) / len(scores)


def finetune(
    task: LabelledTask,
    *,
    model: str,
    weights: Path | None,
    settings: FinetuneSettings,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune `model` (random init when `weights` is None) with a new linear head; the epoch
    with the best validation accuracy is evaluated on test."""
    torch.manual_seed(settings.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = create_encoder(model, settings.image_size, weights=weights)
    network.reset_classifier(len(task.classes))
    network.to(device)
    train = DataLoader(
        LabelledImages(task.splits["train"], finetune_transform(settings.image_size)),
        batch_size=settings.batch_size, shuffle=True, num_workers=settings.workers,
        generator=torch.Generator().manual_seed(settings.seed),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    best_accuracy, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, settings.epochs + 1):
        network.train()
        for images, labels in train:
            loss = F.cross_entropy(network(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        val_accuracy, _ = accuracy_and_macro_f1(_confusion(network, task, "val", settings))
        progress(
            f"{task.name}: epoch {epoch}/{settings.epochs} validation accuracy {val_accuracy:.3f}"
        )
        if val_accuracy > best_accuracy:
            best_accuracy, best_epoch = val_accuracy, epoch
            best_state = copy.deepcopy(network.state_dict())
    network.load_state_dict(best_state)
    matrix = _confusion(network, task, "test", settings)
    accuracy, macro_f1 = accuracy_and_macro_f1(matrix)
    return {
        "task": task.name,
        "classes": task.classes,
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "confusion": matrix,
        "best_epoch": best_epoch,
        "val_accuracy": best_accuracy,
        "images": {split: len(items) for split, items in task.splits.items()},
        "unreadable": task.failures,
    }


@torch.no_grad()
def _confusion(
    network: torch.nn.Module, task: LabelledTask, split: str, settings: FinetuneSettings
) -> list[list[int]]:
    network.eval()
    loader = DataLoader(
        LabelledImages(task.splits[split], eval_transform(settings.image_size)),
        batch_size=settings.batch_size, num_workers=settings.workers,
    )  # fmt: skip
    truth, predicted = [], []
    for images, labels in loader:
        truth += labels.tolist()
        predicted += network(images.to(next(network.parameters()).device)).argmax(1).tolist()
    return confusion_matrix(truth, predicted, len(task.classes))


def table_ii_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Our results (`rows`: init, method, data, task, accuracy, macro_f1) as Table II, accuracy %
    (macro F1 %), followed by the paper's published rows."""
    ours: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        cell = f"{100 * row['accuracy']:.2f} ({100 * row['macro_f1']:.2f})"
        ours.setdefault((row["init"], row["method"], row["data"]), {})[row["task"]] = cell
    tasks = sorted({row["task"] for row in rows})
    tasks += [task for task in PAPER_TASKS if task not in tasks]
    lines = ["| source | init | method | data | " + " | ".join(tasks) + " |",
             "|---" * (4 + len(tasks)) + "|"]  # fmt: skip
    entries = [("ours", *key, cells) for key, cells in sorted(ours.items())]
    entries += [("paper", *row[:3], dict(zip(PAPER_TASKS, row[3:], strict=True)))
                for row in PUBLISHED_TABLE_II]  # fmt: skip
    for source, init, method, data, cells in entries:
        values = " | ".join(cells.get(task, "") for task in tasks)
        lines.append(f"| {source} | {init} | {method} | {data} | {values} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Candidate:
    """One Table II row to evaluate: an encoder file (None: random init) and its labels."""

    init: str
    method: str
    data: str
    model: str
    weights: Path | None

    @property
    def row_id(self) -> str:
        return "__".join((self.init, self.method, self.data)).replace("/", "-")


def candidates(layout: DataLayout, settings: FinetuneSettings) -> list[Candidate]:
    """Every finished pre-training under the data folder, plus the baseline rows."""
    rows = []
    for job_file in sorted(layout.ssl_checkpoints_dir.glob(f"*/{JOB_FILE}")):
        encoder = job_file.parent / ENCODER_FILE
        if encoder.is_file():
            job = PretrainJob.load(job_file)
            method, data = METHOD_NAMES[job.method], DATA_NAMES.get(job.data, job.data)
            rows.append(
                Candidate(job.settings.init_label, method, data, job.settings.model, encoder)
            )
    if settings.random_init_baseline:
        rows.append(Candidate("random", "none", "none", settings.baseline_model, None))
    if settings.imagenet_init:
        weights = Path(settings.imagenet_init)
        rows.append(Candidate("ImageNet", "none", "none", settings.baseline_model, weights))
    return rows


@dataclass
class Evaluation:
    rows: list[dict[str, Any]]  # one finetune() result per task and encoder, with its labels
    failures: list[dict[str, str]]  # {"file", "reason"}: unreadable images, tasks, encoders
    reused: int  # rows taken from an earlier run with the same fingerprint


def evaluate_all(
    layout: DataLayout, settings: FinetuneSettings, progress: Callable[[str], None] = print
) -> Evaluation:
    """Fine-tune every candidate on every task; results already computed for the same encoder
    bytes, settings and task images are reused. A task or encoder that fails is recorded in
    failures and the others go on."""
    rows, failures, reused = [], [], 0
    settings_key = json.dumps(
        {k: v for k, v in asdict(settings).items() if k != "tasks"}, sort_keys=True
    )
    encoders = [(c, sha256_file(c.weights) if c.weights else "random")
                for c in candidates(layout, settings)]  # fmt: skip
    for name, root in sorted(settings.tasks.items()):
        try:
            task = load_task(name, Path(root), settings.seed)
        except (OSError, ValueError) as exc:
            failures.append({"file": str(root), "reason": f"task {name}: {exc}"})
            continue
        failures += task.failures
        images = json.dumps({split: [str(path) for path, _ in items]
                             for split, items in task.splits.items()})  # fmt: skip
        for candidate, encoder_hash in encoders:
            weights = candidate.weights
            fingerprint = hashlib.sha256(
                "|".join([settings_key, images, candidate.model, encoder_hash]).encode()
            ).hexdigest()
            result_path = layout.ssl_eval_dir / name / f"{candidate.row_id}.json"
            result = json.loads(result_path.read_text()) if result_path.exists() else {}
            if result.get("fingerprint") == fingerprint:
                reused += 1
            else:
                progress(f"fine-tuning {candidate.row_id} on {name}")
                try:
                    result = finetune(task, model=candidate.model, weights=weights,
                                      settings=settings, progress=progress)  # fmt: skip
                except (OSError, ValueError, RuntimeError) as exc:
                    failures.append({"file": str(weights or candidate.model), "reason": str(exc)})
                    continue
                result |= asdict(candidate) | {
                    "weights": str(weights or ""),
                    "fingerprint": fingerprint,
                }
                with atomic_path(result_path) as tmp:
                    tmp.write_text(json.dumps(result, indent=2))
            rows.append(result)
    return Evaluation(rows, failures, reused)


def confusion_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Each result's confusion matrix as a markdown table (rows: true class)."""
    parts = []
    for row in rows:
        header = "| true \\ predicted | " + " | ".join(row["classes"]) + " |"
        lines = [header, "|---" * (len(row["classes"]) + 1) + "|"]
        lines += [
            f"| {name} | " + " | ".join(map(str, counts)) + " |"
            for name, counts in zip(row["classes"], row["confusion"], strict=True)
        ]
        title = f"**{row['task']}: {row['init']} / {row['method']} / {row['data']}**"
        parts.append(title + f" (best epoch {row['best_epoch']})\n\n" + "\n".join(lines))
    return "\n\n".join(parts)
