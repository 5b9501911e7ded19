"""A trained encoder as a timm model folder: loads by `local-dir:` with no other argument, and its
model card says what it was pre-trained on, what was held out, the recipe and its results."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from cpia_assets.core.training.ssl.common import create_encoder
from cpia_assets.core.training.ssl.config import PretrainJob
from cpia_assets.core.training.ssl.export import (
    MODEL_CARD,
    export_timm_folder,
    model_card,
    update_model_card,
)
from cpia_assets_tests.support.ssl_data import tiny_settings

HELD_OUT = {"applied": True, "rules": ["cam16", "prcc"], "images": {"val/test split": 3}}


def _job(out: Path, held_out: dict) -> PretrainJob:
    return PretrainJob("mae", "cpia-s", "/data/shards/cpia-s", ("S",), str(out),
                       tiny_settings(image_size=48), "fingerprint-1", held_out)  # fmt: skip


def test_the_folder_loads_in_timm_with_no_argument_to_guess(tmp_path: Path) -> None:
    encoder = create_encoder("vit_tiny_patch16_224", 48)
    folder = export_timm_folder(encoder, _job(tmp_path, HELD_OUT), tmp_path)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    assert loaded.patch_embed.img_size == (48, 48)
    assert loaded.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]
    expected = encoder.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "model.safetensors"]  # fmt: skip


def test_the_model_card_states_data_exclusions_recipe_and_results(tmp_path: Path) -> None:
    job = _job(tmp_path, HELD_OUT)
    folder = export_timm_folder(create_encoder("vit_tiny_patch16_224", 48), job, tmp_path)
    card = (folder / MODEL_CARD).read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "# vit_tiny_patch16_224: MAE pre-trained on CPIA-S" in card
    assert "fingerprint `fingerprint-1`" in card and "`cam16`, `prcc`" in card
    assert "images held out: 3 val/test split" in card
    assert '"mask_ratio": 0.75' in card and "Not evaluated yet" in card
    row = {"task": "WBC", "accuracy": 0.9758, "macro_f1": 0.9583, "images": {"test": 4339},
           "leaks": 0}  # fmt: skip
    update_model_card(folder, job, [row])
    card = (folder / MODEL_CARD).read_text()
    assert "- WBC: test accuracy 97.58 %, macro F1 95.83 % (n=4339 test images" in card
    unprotected = _job(tmp_path, {"applied": False, "rules": [], "images": {}})
    assert "**exported without exclusions**" in model_card(unprotected)
