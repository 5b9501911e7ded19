"""DINO (Caron et al., 2021): a student matches a momentum teacher's centred, sharpened outputs
across multi-crop views."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from cpia_assets.core.training.datasets import Transform
from cpia_assets.core.training.ssl.augment import dino_views
from cpia_assets.core.training.ssl.common import (
    cosine_momentum,
    frozen_copy,
    mean_across_ranks,
    momentum_update,
)
from cpia_assets.core.training.ssl.config import DINOSettings


class DINOHead(nn.Module):
    """3-layer MLP, L2-normalised bottleneck, weight-normed last layer with its norm fixed to 1."""

    def __init__(self, in_dim: int, settings: DINOSettings) -> None:
        super().__init__()
        hidden = settings.hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, settings.bottleneck_dim),
        )  # fmt: skip
        self.last = weight_norm(nn.Linear(settings.bottleneck_dim, settings.out_dim, bias=False))
        magnitude = self.last.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(features), dim=-1))


class DINO(nn.Module):
    def __init__(self, build_encoder: Callable[[], nn.Module], settings: DINOSettings) -> None:
        super().__init__()
        self.settings = settings
        encoder = build_encoder()
        dim = encoder.embed_dim
        self.student = nn.Sequential(encoder, DINOHead(dim, settings))
        self.teacher = frozen_copy(
            self.student, nn.Sequential(build_encoder(), DINOHead(dim, settings))
        )
        self.register_buffer("center", torch.zeros(1, settings.out_dim))

    def views(self, image_size: int) -> Transform:
        patch = self.student[0].patch_embed.patch_size[0]
        local = max(patch, round(image_size * self.settings.local_crop_fraction / patch) * patch)
        return dino_views(image_size, local, self.settings.local_crops)

    def export_encoder(self) -> nn.Module:
        return self.teacher[0]  # the paper evaluates the teacher

    def after_step(self, progress: float) -> None:
        momentum_update(
            self.student, self.teacher, cosine_momentum(self.settings.momentum, progress)
        )

    def training_loss(
        self, views: list[torch.Tensor], seeds: torch.Tensor, progress: float
    ) -> torch.Tensor:
        settings = self.settings
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher(global_views).float()
            targets = F.softmax((teacher_out - self.center) / settings.teacher_temp, dim=-1).chunk(
                2
            )
        student_out = [self.student(global_views)]
        if len(views) > 2:  # local crops have their own size: one forward pass for them all
            student_out.append(self.student(torch.cat(views[2:])))
        log_probs = F.log_softmax(torch.cat(student_out).float() / settings.student_temp, dim=-1)
        log_probs = log_probs.chunk(len(views))
        pairs = [(t, s) for t, s in itertools.product(range(2), range(len(views))) if t != s]
        loss = sum(-(targets[t] * log_probs[s]).sum(-1).mean() for t, s in pairs) / len(pairs)
        with torch.no_grad():
            batch_center = mean_across_ranks(teacher_out.mean(0, keepdim=True))
            self.center.mul_(settings.center_momentum).add_(
                batch_center, alpha=1 - settings.center_momentum
            )
        return loss
