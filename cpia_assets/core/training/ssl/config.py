"""Settings of pre-training and fine-tuning (the run config of ssl_checkpoint and downstream_eval)
and the resolved job a training process runs, stored as JSON beside its outputs. No torch import:
the Dagster definitions load this module."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from cpia_assets.core.catalog.fields import KEY_PATTERN
from cpia_assets.core.fsutil import atomic_path
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.variants import VARIANT_FOLDERS

METHODS = ("mae", "mocov3", "dino")
METHOD_NAMES = {"mae": "MAE", "mocov3": "MoCo-v3", "dino": "DINO"}  # as in Table II
DATA_NAMES = {"cpia-mini": "CPIA-Mini", "cpia": "CPIA", "cpia-l": "CPIA-L", "cpia-m": "CPIA-M",
              "cpia-s": "CPIA-S"}  # fmt: skip
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class OptimizerRecipe:
    """A method's AdamW as its authors ran it: `base_lr` per 256 images (scaled linearly by the
    total batch), weight decay on a cosine schedule from `weight_decay` to `weight_decay_end`
    (equal: constant) and gradient clipping at `gradient_clip` (0 = off). PretrainSettings'
    `lr`, `weight_decay` and `gradient_clip` override these when not 0."""

    base_lr: float = 1.5e-4
    weight_decay: float = 0.05
    weight_decay_end: float = 0.05
    beta1: float = 0.9  # AdamW's betas
    beta2: float = 0.95
    gradient_clip: float = 0.0


@dataclass(frozen=True)
class MAESettings(OptimizerRecipe):
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # targets normalised per patch, as in the paper's best setting
    sincos_pos_embed: bool = True  # fixed 2-D sin-cos in encoder and decoder
    xavier_decoder: bool = True  # decoder Linears Xavier-uniform, biases 0

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mae.mask_ratio must lie in (0, 1), got {self.mask_ratio}")


@dataclass(frozen=True)
class DINOSettings(OptimizerRecipe):
    base_lr: float = 5e-4
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    beta2: float = 0.999
    gradient_clip: float = 3.0
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 65536
    local_crops: int = 8
    local_crop_fraction: float = 96 / 224  # local crop edge relative to the image size
    warmup_teacher_temp: float = 0.04  # rising linearly to teacher_temp
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: float = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher EMA, rising to 1 on a cosine schedule
    freeze_last_layer_epochs: float = 1  # the head's last layer gets no update meanwhile
    drop_path: float = 0.1  # stochastic depth in the student's encoder (not the teacher's)
    head_init_std: float = 0.02  # truncated-normal std of the head's MLP weights


@dataclass(frozen=True)
class MoCoSettings(OptimizerRecipe):
    weight_decay: float = 0.1
    weight_decay_end: float = 0.1
    beta2: float = 0.999
    hidden_dim: int = 4096
    out_dim: int = 256
    temperature: float = 0.2
    momentum: float = 0.99  # momentum encoder EMA, rising to 1 on a cosine schedule
    predictor_last_bn: bool = True  # the ViT reference's predictor ends in an affine-free BN
    frozen_patch_embed: bool = True  # random patch projection, never trained (stability trick)
    sincos_pos_embed: bool = True  # fixed 2-D sin-cos position embedding (stability trick)


@dataclass(frozen=True)
class MonitorSettings:
    """kNN accuracy of the encoder while it trains, every `every` optimizer steps and at the
    last (0 = off), on `tasks` (as FinetuneSettings.tasks; empty: the catalog's labelled ROI
    sets with a split rule whose records are built): at most `max_images` of their train part as
    memory bank and of their val part as queries, never their test part."""

    every: int = 0
    tasks: dict[str, str] = field(default_factory=dict)
    max_images: int = 1000

    def __post_init__(self) -> None:
        if self.every < 0 or self.max_images < 1:
            raise ValueError("monitor.every must be >= 0 and monitor.max_images >= 1")


@dataclass(frozen=True)
class PretrainSettings:
    """Pre-training knobs. `steps` counts optimizer steps; `epochs` > 0 replaces it by that many
    passes over the training images. `lr` is the learning rate per 256 images (0: the method's
    `base_lr`); with `scale_lr` the peak is `lr * total batch / 256` (batch x accumulation x
    devices x nodes), reached after `warmup_steps` and then held (`constant`) or decayed to 0
    (`cosine`). `weight_decay` and `gradient_clip` 0 take the method's (`OptimizerRecipe`).
    `precision` `auto` is bf16-mixed on CUDA and 32-true on CPU. `init` is `random` or a local
    timm checkpoint file (e.g. ImageNet-1k weights); nothing is downloaded."""

    model: str = "vit_base_patch16_224"
    image_size: int = 224
    batch_size: int = 64  # per device and micro-batch
    accumulation: int = 1
    steps: int = 10_000
    epochs: float = 0.0
    lr: float = 0.0
    scale_lr: bool = True
    schedule: str = "cosine"
    warmup_steps: int = 500
    weight_decay: float = 0.0
    gradient_clip: float = 0.0  # max gradient norm
    seed: int = 0
    precision: str = "auto"
    workers: int = 8  # loader processes per device
    init: str = "random"
    checkpoint_every: int = 1000  # optimizer steps between Lightning checkpoints
    keep_checkpoints: int = 3  # the newest periodic checkpoints kept (besides last.ckpt)
    devices: int = 1  # GPUs per node; > 1 or nodes > 1 runs DDP under torchrun
    nodes: int = 1
    rendezvous: str = ""  # host:port of the first node, when nodes > 1
    mae: MAESettings = field(default_factory=MAESettings)
    mocov3: MoCoSettings = field(default_factory=MoCoSettings)
    dino: DINOSettings = field(default_factory=DINOSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)

    def __post_init__(self) -> None:
        positive = (
            "image_size",
            "batch_size",
            "accumulation",
            "checkpoint_every",
            "keep_checkpoints",
            "devices",
            "nodes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 1 and self.epochs <= 0:
            raise ValueError("set steps >= 1 or epochs > 0")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.nodes > 1 and not self.rendezvous:
            raise ValueError("nodes > 1 needs rendezvous (host:port of the first node)")
        if self.init != "random" and not Path(self.init).is_file():
            raise ValueError(
                f"init must be 'random' or a local checkpoint file; {self.init} is missing"
            )

    @property
    def init_label(self) -> str:
        """Table II's init column: random, or ImageNet for a local checkpoint file."""
        return "random" if self.init == "random" else "ImageNet"


@dataclass(frozen=True)
class PretrainJob:
    """Everything one training process needs: method, data and where to write. Its identity
    (config.json) includes the data's fingerprint, so changed data starts a fresh run."""

    method: str
    data: str  # data variant (partition), e.g. cpia-mini
    source: str  # folder root or shard folder
    folders: tuple[str, ...]
    out_dir: str
    settings: PretrainSettings
    data_fingerprint: str = ""  # the export's fingerprint (index.json)
    held_out: dict[str, Any] = field(default_factory=dict)  # the export's held_out record

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown SSL method {self.method!r}; expected one of {METHODS}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> PretrainJob:
        try:
            return from_dict(cls, json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid pre-training job ({exc})") from exc


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning knobs. `tasks` maps a task name (a partition key in any case: it names the
    task's results folder) to a catalog key (the sub-dataset's standardized images, labels and
    split from its records: the split Mini and the exports hold out) or to a local ImageFolder:
    `<split>/<class>/*` with splits train/test (and val, else carved from train 10:2 per class;
    split folders in any case and common spellings), or `<class>/*`, split 7:1:2 per class with
    `seed`.
    Fine-tuning follows MAE's recipe: AdamW with layer-wise lr decay (`layer_decay`, 1 = off),
    `warmup_epochs` of linear warm-up (longer than `epochs`: the lr only rises) then cosine decay
    per step, label smoothing, drop-path (stochastic depth, rising to `drop_path` in the last
    block), average pooling with `fc_norm` for MAE encoders (`mae_global_pool`) and bf16 autocast
    on CUDA (`bf16`).
    `task_sources` declares, per task, the exclusion rules naming what its images come from
    (default for WBC, pRCC and CAM16: the paper's, `exclusions.PAPER_TASK_SOURCES`); a
    checkpoint whose data did not hold them out is flagged. `imagenet_init` is a local timm
    checkpoint for the ImageNet baseline row (empty: no such row)."""

    tasks: dict[str, str] = field(default_factory=dict)
    task_sources: dict[str, list[str]] = field(default_factory=dict)
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    mae_global_pool: bool = True
    bf16: bool = True
    image_size: int = 224
    seed: int = 0
    workers: int = 4
    random_init_baseline: bool = True
    imagenet_init: str = ""
    baseline_model: str = "vit_base_patch16_224"  # the model of the baseline rows

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if not 0 < self.layer_decay <= 1 or self.warmup_epochs < 0:
            raise ValueError("layer_decay must lie in (0, 1] and warmup_epochs be at least 0")
        if not (0 <= self.label_smoothing < 1 and 0 <= self.drop_path < 1):
            raise ValueError("label_smoothing and drop_path must lie in [0, 1)")
        seen: dict[str, str] = {}
        for name in self.tasks:  # each names its results folder, ssl/eval/<task>/
            if not (name.isascii() and KEY_PATTERN.fullmatch(name.lower())):
                raise ValueError(
                    f"task name {name!r} must be letters, digits and '-' (a partition key in any "
                    "case): it names the task's results folder"
                )
            if name.lower() in seen:  # one folder on a case-insensitive file system
                raise ValueError(
                    f"task names {seen[name.lower()]!r} and {name!r} differ only in case"
                )
            seen[name.lower()] = name


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """A (nested) settings dataclass from its `asdict` form; unknown keys are an error."""
    hints = get_type_hints(cls)
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    converted = {}
    for name, value in values.items():
        kind = hints[name]
        if is_dataclass(kind):
            value = from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        converted[name] = value
    return cls(**converted)


JOB_FILE = "config.json"  # the resolved job, beside the outputs of its training
ENCODER_FILE = "encoder.pth"
ENCODER_JOB_FILE = "encoder.json"  # the job that trained encoder.pth, written with it
SUMMARY_FILE = "summary.json"
LOSS_CURVE_FILE = "loss_curve.png"
LAST_CHECKPOINT = "checkpoints/last.ckpt"
TIMM_FOLDER = "timm"  # the encoder as a timm model folder with its model card (export.py)
RUN_OUTPUTS = (ENCODER_FILE, ENCODER_JOB_FILE, TIMM_FOLDER, SUMMARY_FILE, LOSS_CURVE_FILE,
               "metrics.jsonl", "checkpoints")  # fmt: skip
"""A run's outputs, replaced as one unit when its job changes."""
PREVIOUS_RUN = ".previous"  # the finished run a changed job's run replaces once it has finished


def training_source(layout: DataLayout, variant: str) -> tuple[Path, tuple[str, ...]]:
    """A data variant's shard export and top folders. Only exports are trained on: they hold out
    the evaluation data and record how (index.json), which every checkpoint then carries."""
    if variant not in VARIANT_FOLDERS:
        raise ValueError(
            f"unknown data variant {variant!r}; expected one of {sorted(VARIANT_FOLDERS)}"
        )
    shards = layout.shards_dir(variant)
    if not (shards / "index.json").is_file():
        raise FileNotFoundError(
            f"{shards}/index.json is missing: materialize training_shards for {variant} first"
        )
    return shards, VARIANT_FOLDERS[variant]


def export_identity(shards: Path) -> tuple[str, dict[str, Any]]:
    """The fingerprint and held_out record of a shard export (its index.json)."""
    path = shards / "index.json"
    try:
        index = json.loads(path.read_text())
        return index["fingerprint"], index["held_out"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: no fingerprint or held_out record ({exc}); re-materialize training_shards"
        ) from exc


def prepare_run_dir(job: PretrainJob) -> str:
    """Make the run folder hold `job`'s run; returns `resume` when it holds a checkpoint of the
    same job (same settings and data), else `fresh`. Check the job (`preflight`) first: this
    touches the folder. Another job's outputs never stay in place (resuming them would mix two
    trainings, keeping its encoder would publish it under the new job's name): a finished run is
    set aside in `PREVIOUS_RUN` until the new one has produced its own (`finish_run`), an
    unfinished one is removed. A job whose run is the one set aside gets it back."""
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aside = out / PREVIOUS_RUN
    wanted = job.to_json()
    if _job_text(out) != wanted:
        if _job_text(aside) == wanted:
            _swap_runs(out)
        else:
            if (out / ENCODER_FILE).exists():
                shutil.rmtree(aside, ignore_errors=True)
                _move_run(out, aside)
            else:
                _move_run(out, None)
            job.save(out / JOB_FILE)
    checkpoints = out / "checkpoints"
    return "resume" if checkpoints.is_dir() and any(checkpoints.iterdir()) else "fresh"


def finish_run(out: Path, succeeded: bool) -> None:
    """After a training process: on success the run set aside is dropped; on failure a finished
    run set aside comes back in place of the unfinished one (which a relaunch of its job can
    still resume)."""
    aside = out / PREVIOUS_RUN
    if succeeded:
        shutil.rmtree(aside, ignore_errors=True)
    elif (aside / ENCODER_FILE).exists() and not (out / ENCODER_FILE).exists():
        _swap_runs(out)


def _job_text(folder: Path) -> str | None:
    path = folder / JOB_FILE
    return path.read_text() if path.is_file() else None


def _move_run(source: Path, target: Path | None) -> None:
    """Move a run's job file and outputs from `source` into `target` (None: remove them)."""
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
    for name in (*RUN_OUTPUTS, JOB_FILE):
        entry = source / name
        if target is not None and entry.exists():
            entry.rename(target / name)
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def _swap_runs(out: Path) -> None:
    swap = out / f"{PREVIOUS_RUN}.swap"
    shutil.rmtree(swap, ignore_errors=True)
    _move_run(out, swap)
    _move_run(out / PREVIOUS_RUN, out)
    shutil.rmtree(out / PREVIOUS_RUN)
    swap.rename(out / PREVIOUS_RUN)


def launch_command(
    job_file: Path,
    settings: PretrainSettings,
    python: str = sys.executable,
    module: str = "cpia_assets.core.training.ssl.train",
) -> list[str]:
    """`python -m MODULE JOB` on one device, else the same under torchrun (one process per
    device; with several nodes this starts this node's share and the other nodes run the same
    command with their --node-rank). `module`: the training entry point (the Dagster asset
    passes its Pipes-reporting wrapper)."""
    train = ["-m", module, str(job_file)]
    if settings.devices * settings.nodes == 1:
        return [python, *train]
    command = [python, "-m", "torch.distributed.run", f"--nproc-per-node={settings.devices}"]
    if settings.nodes > 1:
        command += [f"--nnodes={settings.nodes}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={settings.rendezvous}"]  # fmt: skip
    return [*command, *train]
