"""Downstream evaluation: fine-tune each encoder on each labelled task (`tasks.py`), keep the best
epoch on validation, report test accuracy, macro F1 and the confusion matrix (the paper's Table
II), beside kNN and a linear probe of the frozen encoder (`probe.py`), with a leak audit per row.

Each pre-trained encoder is labelled from its own job (`encoder.json`: method, model, data and
init), never from the current settings. The leak audit counts a task's val/test images with a
near-duplicate (perceptual hash) among the samples of the export the encoder was trained on, and
checks that the export held out the task's sources (`exclusions.covers`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
import timm
import torch
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cpia_assets.core.catalog.model import Catalog
from cpia_assets.core.fsutil import atomic_path, sha256_file
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest.leaks import near_duplicates
from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS, phash_file
from cpia_assets.core.training.exclusions import covers
from cpia_assets.core.training.shards import SAMPLES_FILE
from cpia_assets.core.training.ssl.augment import eval_transform, finetune_transform
from cpia_assets.core.training.ssl.common import create_encoder, read_weights
from cpia_assets.core.training.ssl.config import (
    DATA_NAMES,
    ENCODER_FILE,
    ENCODER_JOB_FILE,
    METHOD_NAMES,
    TIMM_FOLDER,
    FinetuneSettings,
    PretrainJob,
    export_identity,
)
from cpia_assets.core.training.ssl.export import update_model_card
from cpia_assets.core.training.ssl.probe import Features, extract_features, probe_predictions
from cpia_assets.core.training.ssl.tasks import (
    LabelledTask,
    load_task,
    task_sources,
    write_splits_csv,
)

_RESULT_VERSION = 3
"""Part of every result's fingerprint: a change of what a result holds recomputes it."""


class LabelledImages(Dataset):
    def __init__(self, items: Sequence[tuple[Path, int]], transform: Callable) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), label
        except OSError as exc:  # checked when the task loaded: changed since
            raise OSError(f"{path}: unreadable image ({exc})") from exc


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


@dataclass
class Finetuning:
    """What one fine-tuning trains with (`finetuning`)."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: CosineLRScheduler  # stepped per optimizer step (`step_update`)
    loss: nn.Module


def finetuning(
    model: str,
    weights: Path | None,
    classes: int,
    settings: FinetuneSettings,
    *,
    steps_per_epoch: int,
    average_pool: bool = False,
) -> Finetuning:
    """MAE's fine-tuning of a ViT: a new head, drop-path, AdamW whose lr decays layer-wise from
    the head (timm's groups; the schedule applies their `lr_scale`), linear warm-up then cosine
    decay, label smoothing. `average_pool`: pool the patch tokens through `fc_norm` instead of
    taking the class token, as MAE fine-tunes its encoders; their final `norm` is then dropped
    and `fc_norm` starts fresh."""
    pool = {"global_pool": "avg"} if average_pool else {}
    network = timm.create_model(model, num_classes=classes, img_size=settings.image_size,
                                drop_path_rate=settings.drop_path, **pool)  # fmt: skip
    if weights:  # checked and resampled by the encoder; norm/fc_norm and head differ
        encoder = create_encoder(model, settings.image_size, weights=weights)
        network.load_state_dict(encoder.state_dict(), strict=False)
    optimizer = create_optimizer_v2(network, opt="adamw", lr=settings.lr,
                                    weight_decay=settings.weight_decay,
                                    layer_decay=settings.layer_decay)  # fmt: skip
    warmup = settings.warmup_epochs * steps_per_epoch
    schedule = CosineLRScheduler(
        optimizer, t_initial=max(settings.epochs * steps_per_epoch - warmup, 1), warmup_t=warmup,
        warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip
    return Finetuning(network, optimizer, schedule,
                      LabelSmoothingCrossEntropy(smoothing=settings.label_smoothing))  # fmt: skip


def _autocast(device: torch.device, settings: FinetuneSettings) -> torch.autocast:
    enabled = settings.bf16 and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def finetune(
    task: LabelledTask,
    *,
    model: str,
    weights: Path | None,
    settings: FinetuneSettings,
    average_pool: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune `model` (random init when `weights` is None) with a new linear head
    (`finetuning`); the epoch with the best validation accuracy is evaluated on test."""
    torch.manual_seed(settings.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = DataLoader(
        LabelledImages(task.splits["train"], finetune_transform(settings.image_size)),
        batch_size=settings.batch_size, shuffle=True, num_workers=settings.workers,
        generator=torch.Generator().manual_seed(settings.seed),
    )  # fmt: skip
    run = finetuning(model, weights, len(task.classes), settings, steps_per_epoch=len(train),
                     average_pool=average_pool)  # fmt: skip
    network = run.network.to(device)
    best_accuracy, best_epoch, best_state, step = -1.0, 0, None, 0
    for epoch in range(1, settings.epochs + 1):
        network.train()
        for images, labels in train:
            run.schedule.step_update(step)
            step += 1
            with _autocast(device, settings):
                loss = run.loss(network(images.to(device)), labels.to(device))
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
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


def frozen_features(
    task: LabelledTask, *, model: str, weights: Path | None, settings: FinetuneSettings
) -> dict[str, Features]:
    """The frozen encoder's features and labels of each split of `task`."""
    torch.manual_seed(settings.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = create_encoder(model, settings.image_size, weights=weights).to(device)
    return {
        split: extract_features(encoder, DataLoader(
            LabelledImages(task.splits[split], eval_transform(settings.image_size)),
            batch_size=settings.batch_size, num_workers=settings.workers,
        ))
        for split in ("train", "val", "test")
    }  # fmt: skip


def frozen_predictions(
    task: LabelledTask, *, model: str, weights: Path | None, settings: FinetuneSettings
) -> tuple[list[int], dict[str, list[int]]]:
    """The test labels, and per frozen-encoder method (`probe`: kNN, linear probe) its test
    predictions in the same order (per image, so that two encoders can be compared pairwise)."""
    features = frozen_features(task, model=model, weights=weights, settings=settings)
    predictions = probe_predictions(features, len(task.classes), seed=settings.seed)
    return features["test"].labels.tolist(), {k: list(v) for k, v in predictions.items()}


def frozen_evaluations(
    task: LabelledTask, *, model: str, weights: Path | None, settings: FinetuneSettings
) -> dict[str, dict[str, float]]:
    """Test accuracy and macro F1 of kNN and of a linear probe on the frozen encoder."""
    truth, predictions = frozen_predictions(task, model=model, weights=weights, settings=settings)
    return {
        name: prediction_scores(truth, predicted, len(task.classes))
        for name, predicted in predictions.items()
    }


def prediction_scores(
    truth: Sequence[int], predicted: Sequence[int], classes: int
) -> dict[str, float]:
    """Accuracy and macro F1 of `predicted` against `truth`."""
    accuracy, macro_f1 = accuracy_and_macro_f1(confusion_matrix(truth, predicted, classes))
    return {"accuracy": accuracy, "macro_f1": macro_f1}


@torch.no_grad()
def _confusion(
    network: torch.nn.Module, task: LabelledTask, split: str, settings: FinetuneSettings
) -> list[list[int]]:
    network.eval()
    loader = DataLoader(
        LabelledImages(task.splits[split], eval_transform(settings.image_size)),
        batch_size=settings.batch_size, num_workers=settings.workers,
    )  # fmt: skip
    device = next(network.parameters()).device
    truth, predicted = [], []
    for images, labels in loader:
        truth += labels.tolist()
        with _autocast(device, settings):
            predicted += network(images.to(device)).argmax(1).tolist()
    return confusion_matrix(truth, predicted, len(task.classes))


@dataclass(frozen=True)
class Candidate:
    """One Table II row to evaluate: an encoder file (None: random init), its labels and the
    job that trained it (None for the baseline rows)."""

    init: str
    method: str
    data: str
    model: str
    weights: Path | None
    job: PretrainJob | None = None

    @property
    def row_id(self) -> str:
        return "__".join((self.init, self.method, self.data)).replace("/", "-")


def candidates(layout: DataLayout, settings: FinetuneSettings) -> tuple[list[Candidate], list]:
    """Every finished pre-training under the data folder, labelled from the job saved with its
    encoder, plus the baseline rows; and failures for encoders that cannot be labelled or whose
    weights file cannot be read (one row each, naming the file, not one per task)."""
    rows, failures = [], []
    for encoder in sorted(layout.ssl_checkpoints_dir.glob(f"*/{ENCODER_FILE}")):
        try:
            job = PretrainJob.load(encoder.with_name(ENCODER_JOB_FILE))
        except ValueError as exc:
            failures.append({"file": str(encoder), "reason": f"cannot label the encoder: {exc}"})
            continue
        method, data = METHOD_NAMES[job.method], DATA_NAMES.get(job.data, job.data)
        init = job.settings.init_label
        rows.append(Candidate(init, method, data, job.settings.model, encoder, job))
    if settings.random_init_baseline:
        rows.append(Candidate("random", "none", "none", settings.baseline_model, None))
    if settings.imagenet_init:
        weights = Path(settings.imagenet_init)
        rows.append(Candidate("ImageNet", "none", "none", settings.baseline_model, weights))
    readable = []
    for candidate in rows:
        try:
            if candidate.weights:
                read_weights(candidate.weights)
        except ValueError as exc:
            failures.append({"file": str(candidate.weights), "reason": str(exc)})
            continue
        readable.append(candidate)
    return readable, failures


def result_fingerprint(
    settings: FinetuneSettings, task: LabelledTask, candidate: Candidate, encoder_hash: str
) -> str:
    """What a result depends on: every fine-tuning setting (the tasks themselves only through
    this task's images, their labels, splits and files), the candidate's model, job and encoder
    bytes."""
    values = asdict(settings) | {"tasks": None, "task_sources": None}
    images = {split: [(str(path), label, *_stamp(path)) for path, label in items]
              for split, items in task.splits.items()}  # fmt: skip
    job = asdict(candidate.job) if candidate.job else None
    parts = [_RESULT_VERSION, values, task.classes, images, candidate.model, job, encoder_hash]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    """Size and modification time: an image rewritten in place changes the fingerprint."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class Audit:
    """A row's leak audit: val/test images with a near-duplicate in its pre-training data
    (None: not pre-trained here, or not auditable), and the task sources it did not hold out."""

    leaks: int | None
    sources_not_held_out: list[str]
    exclusions_applied: bool
    problem: str | None = None


def audit(task: LabelledTask, candidate: Candidate, max_distance: int) -> Audit:
    job = candidate.job
    if job is None:  # random init: nothing pre-trained; ImageNet weights: not our data
        return Audit(0 if candidate.weights is None else None, [], True)
    held = job.held_out
    applied = bool(held.get("applied"))
    missing = covers(held.get("rules", []), task.sources) if applied else list(task.sources)
    try:
        fingerprint, _ = export_identity(Path(job.source))
    except ValueError as exc:
        return Audit(None, missing, applied, str(exc))
    if fingerprint != job.data_fingerprint:
        problem = f"{job.source} was re-exported since {candidate.weights} was trained: retrain it"
        return Audit(None, missing, applied, problem)
    queries = pl.DataFrame(
        [{"image": str(path), "phash": task.hashes.get(path)} for path in task.evaluation_images],
        schema={"image": pl.String, "phash": pl.Int64},
    )
    found = near_duplicates(queries, Path(job.source) / SAMPLES_FILE, max_distance=max_distance)
    unhashed = found["near_duplicates"].null_count()
    if unhashed:
        problem = f"task {task.name}: {unhashed} val/test images have no perceptual hash"
        return Audit(None, missing, applied, problem)
    return Audit(int((found["near_duplicates"] > 0).sum()), missing, applied)


def _hash_evaluation_images(task: LabelledTask) -> None:
    """Perceptual hashes of a folder task's val/test images (catalog tasks have them stored)."""
    for path in task.evaluation_images:
        if path not in task.hashes:
            task.hashes[path] = phash_file(path)


@dataclass
class Evaluation:
    rows: list[dict[str, Any]]  # one finetune() result per task and encoder, with its labels
    failures: list[dict[str, str]]  # {"file", "reason"}: unreadable images, tasks, encoders
    reused: int  # rows taken from an earlier run with the same fingerprint


def evaluate_all(
    layout: DataLayout,
    catalog: Catalog,
    settings: FinetuneSettings,
    progress: Callable[[str], None] = print,
    max_distance: int = NEAR_DUPLICATE_BITS,
) -> Evaluation:
    """Fine-tune every candidate on every task and audit each row for leaks; results already
    computed with the same fingerprint are reused. A task or encoder that fails is recorded in
    failures and the others go on."""
    rows: list[dict[str, Any]] = []
    found, failures = candidates(layout, settings)
    encoders = [(c, sha256_file(c.weights) if c.weights else "random") for c in found]
    reused = 0
    for name, origin in sorted(settings.tasks.items()):
        sources = task_sources(name, settings.task_sources)
        try:
            task = load_task(name, origin, layout=layout, catalog=catalog, seed=settings.seed,
                             sources=sources)  # fmt: skip
            _hash_evaluation_images(task)
        except (OSError, ValueError) as exc:
            failures.append({"file": str(origin), "reason": f"task {name}: {exc}"})
            continue
        failures += task.failures
        write_splits_csv(task, layout)
        for candidate, encoder_hash in encoders:
            fingerprint = result_fingerprint(settings, task, candidate, encoder_hash)
            result_path = layout.ssl_eval_dir / name / f"{candidate.row_id}.json"
            result = json.loads(result_path.read_text()) if result_path.exists() else {}
            if result.get("fingerprint") == fingerprint:
                reused += 1
            else:
                progress(f"fine-tuning {candidate.row_id} on {name}")
                try:
                    average_pool = settings.mae_global_pool and candidate.method == "MAE"
                    result = finetune(task, model=candidate.model, weights=candidate.weights,
                                      settings=settings, average_pool=average_pool,
                                      progress=progress)  # fmt: skip
                    result |= frozen_evaluations(
                        task, model=candidate.model, weights=candidate.weights, settings=settings
                    )
                except (OSError, ValueError, RuntimeError) as exc:
                    failures.append(
                        {"file": str(candidate.weights or candidate.model), "reason": str(exc)}
                    )
                    continue
            checked = audit(task, candidate, max_distance)
            if checked.problem:
                failures.append({"file": str(candidate.weights), "reason": checked.problem})
            result |= (
                asdict(candidate)
                | asdict(checked)
                | {
                    "job": None,
                    "weights": str(candidate.weights or ""),
                    "sources": list(task.sources),
                    "fingerprint": fingerprint,
                }
            )
            with atomic_path(result_path) as tmp:
                tmp.write_text(json.dumps(result, indent=2, default=str))
            rows.append(result)
    for candidate, _ in encoders:  # each shared model folder's card gets the rows it reached
        if candidate.job and (candidate.weights.parent / TIMM_FOLDER).is_dir():
            reached = [row for row in rows if row["weights"] == str(candidate.weights)]
            update_model_card(candidate.weights.parent / TIMM_FOLDER, candidate.job, reached)
    return Evaluation(rows, failures, reused)
