"""Checks that a pre-training job's settings fit together and fit its model, without training: the
asset runs them before it touches the run folder, the training process again before it starts."""

from __future__ import annotations

import timm
import torch

from cpia_assets.core.training.ssl.common import create_encoder
from cpia_assets.core.training.ssl.config import PretrainJob
from cpia_assets.core.training.ssl.mae import masked_patches


def check_job(job: PretrainJob) -> None:
    """Raise ValueError naming every setting that would fail or train on nothing. The model is
    built on the meta device (no memory, no weights) to learn its patch size."""
    settings = job.settings
    if not timm.is_model(settings.model):
        raise ValueError(f"unknown timm model {settings.model!r}")
    try:
        with torch.device("meta"):
            encoder = create_encoder(settings.model, settings.image_size)
        patch, patches = encoder.patch_embed.patch_size[0], encoder.patch_embed.num_patches
    except (AttributeError, AssertionError, RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{settings.model} is not a ViT this pre-training can use: {exc}") from exc
    problems = []
    if settings.image_size % patch:
        problems.append(
            f"image_size {settings.image_size} is not a multiple of the patch size {patch}"
        )
    if job.method == "mae" and masked_patches(patches, settings.mae.mask_ratio) < 1:
        problems.append(
            f"mae.mask_ratio {settings.mae.mask_ratio} masks none of the {patches} patches of a "
            f"{settings.image_size} px image: MAE would have nothing to predict"
        )
    if job.method == "mocov3" and settings.batch_size < 2:
        problems.append("MoCo-v3's BatchNorm needs batch_size >= 2 per device")
    if problems:
        raise ValueError(f"{job.method} settings for {settings.model}: " + "; ".join(problems))
