"""Pre-training settings (the run config of ssl_checkpoint) and the resolved job a training
process runs, stored as JSON beside its outputs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from cpia_assets.core.ssl.dino import DINOSettings
from cpia_assets.core.ssl.mae import MAESettings
from cpia_assets.core.ssl.mocov3 import MoCoSettings

METHODS = ("mae", "mocov3", "dino")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class PretrainSettings:
    """Pre-training knobs. `steps` counts optimizer steps; `epochs` > 0 replaces it by that many
    passes over the training images. `lr` is the peak learning rate (AdamW), reached after
    `warmup_steps` and then held (`constant`) or decayed to 0 (`cosine`). `precision` `auto` is
    bf16-mixed on CUDA and 32-true on CPU. `init` is `random` or a local timm checkpoint file
    (e.g. ImageNet-1k weights); nothing is downloaded."""

    model: str = "vit_base_patch16_224"
    image_size: int = 224
    batch_size: int = 64  # per device and micro-batch
    accumulation: int = 1
    steps: int = 10_000
    epochs: float = 0.0
    lr: float = 1.5e-4
    schedule: str = "cosine"
    warmup_steps: int = 500
    weight_decay: float = 0.05
    seed: int = 0
    precision: str = "auto"
    workers: int = 8  # loader processes per device
    init: str = "random"
    checkpoint_every: int = 1000  # optimizer steps between Lightning checkpoints
    devices: int = 1  # GPUs per node; > 1 or nodes > 1 runs DDP under torchrun
    nodes: int = 1
    mae: MAESettings = field(default_factory=MAESettings)
    mocov3: MoCoSettings = field(default_factory=MoCoSettings)
    dino: DINOSettings = field(default_factory=DINOSettings)

    def __post_init__(self) -> None:
        positive = (
            "image_size",
            "batch_size",
            "accumulation",
            "checkpoint_every",
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
        if self.init != "random" and not Path(self.init).is_file():
            raise ValueError(
                f"init must be 'random' or a local checkpoint file; {self.init} is missing"
            )


@dataclass(frozen=True)
class PretrainJob:
    """Everything one training process needs: method, data and where to write."""

    method: str
    data: str  # data variant (partition), e.g. cpia-mini
    source: str  # folder root or shard folder
    folders: tuple[str, ...]
    out_dir: str
    settings: PretrainSettings

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown SSL method {self.method!r}; expected one of {METHODS}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> PretrainJob:
        try:
            return from_dict(cls, json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid pre-training job ({exc})") from exc


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
