"""A trained encoder as a timm model folder anyone can load and share:
`timm.create_model("local-dir:<folder>", pretrained=True, num_classes=0)` needs no other
argument. timm writes `config.json` (architecture, its arguments such as `img_size`, and
`pretrained_cfg` with our normalisation) and `model.safetensors`; `README.md` is a model card in
the Hugging Face convention: the data it was pre-trained on (and what was held out), the recipe,
and the Table II rows it reached (added by the evaluation)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from timm.models import save_for_hf
from torch import nn

from cpia_assets.core.fsutil import atomic_path
from cpia_assets.core.training.ssl.augment import MEAN, STD
from cpia_assets.core.training.ssl.config import (
    DATA_NAMES,
    METHOD_NAMES,
    TIMM_FOLDER,
    PretrainJob,
)

MODEL_CARD = "README.md"
RESULTS_HEADING = "## Table II rows (downstream evaluation)"


def export_timm_folder(encoder: nn.Module, job: PretrainJob, out: Path) -> Path:
    """`out/timm/`: the encoder as a timm model folder with its model card, replaced at once."""
    folder = out / TIMM_FOLDER
    with atomic_path(folder) as staging:
        pretrained_cfg = {
            "tag": f"cpia-{job.method}-{job.data}",
            "mean": list(MEAN),
            "std": list(STD),
            "license": "other",
        }
        save_for_hf(
            encoder, str(staging), model_config={"pretrained_cfg": pretrained_cfg},
            model_args={"img_size": job.settings.image_size, "num_classes": 0},
            safe_serialization=True,
        )  # fmt: skip
        (staging / MODEL_CARD).write_text(model_card(job))
    return folder


def model_card(job: PretrainJob, results: Sequence[Mapping[str, Any]] = ()) -> str:
    settings = job.settings
    held = job.held_out or {}
    if held.get("applied"):
        rules = ", ".join(f"`{rule}`" for rule in held.get("rules", [])) or "none"
        counts = ", ".join(f"{n} {reason}" for reason, n in held.get("images", {}).items())
        held_out = (
            f"held out for evaluation: labelled sets' val/test images and the exclusion rules "
            f"{rules} (images held out: {counts or 'none'})"
        )
    else:
        held_out = "**exported without exclusions**: evaluation images may be in it"
    method, data = METHOD_NAMES[job.method], DATA_NAMES.get(job.data, job.data)
    recipe = {k: v for k, v in asdict(settings).items() if k not in ("mae", "mocov3", "dino")}
    recipe[job.method] = asdict(getattr(settings, job.method))
    lines = [
        "---", "library_name: timm", "license: other", "tags:", "- image-feature-extraction",
        "- timm", "- pathology", "- self-supervised", "datasets:", f"- {job.data}", "---",
        f"# {settings.model}: {method} pre-trained on {data}", "",
        f"- **Pre-training data:** {data} (shard export `{job.source}`, fingerprint "
        f"`{job.data_fingerprint}`); {held_out}.",
        f"- **Method:** {method}; init: {settings.init_label}.",
        f"- **Load:** `timm.create_model(\"local-dir:<this folder>\", pretrained=True, "
        f"num_classes=0)`; inputs {settings.image_size} px, normalised with mean {list(MEAN)}, "
        f"std {list(STD)}.",
        "", "## Recipe", "", "```json", json.dumps(recipe, indent=1), "```", "",
        RESULTS_HEADING, "",
    ]  # fmt: skip
    if not results:
        lines.append("Not evaluated yet (materialize downstream_eval).")
    for row in results:
        lines.append(
            f"- {row['task']}: test accuracy {100 * row['accuracy']:.2f} %, macro F1 "
            f"{100 * row['macro_f1']:.2f} % (n={row['images']['test']} test images, best epoch "
            f"on validation), leak audit {row['leaks']}"
        )
    return "\n".join(lines) + "\n"


def update_model_card(folder: Path, job: PretrainJob, results: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite the card with the Table II rows this encoder reached."""
    with atomic_path(folder / MODEL_CARD) as tmp:
        tmp.write_text(model_card(job, results))
