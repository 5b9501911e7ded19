"""DINO (Caron et al., 2021): a student matches a momentum teacher's centred, sharpened outputs
across multi-crop views. As in the authors' code: teacher temperature warm-up, the head's last
layer frozen for the first epoch(s), drop-path on the student only, truncated-normal head init;
the weight-decay schedule and gradient clipping are the module's, from `DINOSettings`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from cpia_assets.core.training.datasets import Transform
from cpia_assets.core.training.ssl.augment import dino_views
from cpia_assets.core.training.ssl.common import (
    TrainingTime,
    cosine_schedule,
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
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=settings.head_init_std)
                nn.init.zeros_(layer.bias)
        self.last = weight_norm(nn.Linear(settings.bottleneck_dim, settings.out_dim, bias=False))
        magnitude = self.last.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(features), dim=-1))


def teacher_temperature(settings: DINOSettings, epoch: float) -> float:
    """Linear warm-up from `warmup_teacher_temp` to `teacher_temp`, then constant."""
    warmup = settings.teacher_temp_warmup_epochs
    done = min(1.0, epoch / warmup) if warmup > 0 else 1.0
    start = settings.warmup_teacher_temp
    return start + (settings.teacher_temp - start) * done


def dino_loss(
    teacher_out: torch.Tensor,
    student_views: list[torch.Tensor],
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
) -> torch.Tensor:
    """Cross-entropy of the student's outputs, one tensor per view (the two global views first),
    against the teacher's centred, sharpened outputs of the global views (`teacher_out`: both
    stacked), averaged over the pairs of different views."""
    targets = F.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(2)
    log_probs = [F.log_softmax(view.float() / student_temp, dim=-1) for view in student_views]
    pairs = [(t, s) for t, s in itertools.product(range(2), range(len(log_probs))) if t != s]
    return sum(-(targets[t] * log_probs[s]).sum(-1).mean() for t, s in pairs) / len(pairs)


def teacher_initial_share(momentum: float, total_steps: int) -> float:
    """Product of the teacher momenta over a run (`DINO.after_step`'s cosine schedule)."""
    return math.prod(
        cosine_schedule(momentum, 1.0, step / total_steps) for step in range(total_steps)
    )


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * the teacher's mean output (all ranks)."""
    batch_center = mean_across_ranks(teacher_out.mean(0, keepdim=True))
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


class DINO(nn.Module):
    def __init__(self, build_encoder: Callable[[float], nn.Module], settings: DINOSettings) -> None:
        """`build_encoder(drop_path)` builds one encoder (the teacher's without drop-path)."""
        super().__init__()
        self.settings = settings
        encoder = build_encoder(settings.drop_path)
        dim = encoder.embed_dim
        self.student = nn.Sequential(encoder, DINOHead(dim, settings))
        self.teacher = frozen_copy(
            self.student, nn.Sequential(build_encoder(0.0), DINOHead(dim, settings))
        )
        self.register_buffer("center", torch.zeros(1, settings.out_dim))

    def views(self, image_size: int) -> Transform:
        patch = self.student[0].patch_embed.patch_size[0]
        local = max(patch, round(image_size * self.settings.local_crop_fraction / patch) * patch)
        return dino_views(image_size, local, self.settings.local_crops)

    def export_encoder(self) -> nn.Module:
        return self.teacher[0]  # the paper evaluates the teacher

    def exported_initial_share(self, total_steps: int) -> float:
        """The teacher's weights after `total_steps` are this share of its initial weights (the
        product of the EMA momenta): about exp(-(1 - momentum) * steps / 2), 0.82 after 100
        steps at 0.996, whose time constant suits the reference's ~10^5 steps."""
        return teacher_initial_share(self.settings.momentum, total_steps)

    def adjust_gradients(self, time: TrainingTime) -> None:
        """No update of the head's last layer in its first `freeze_last_layer_epochs` (a missing
        gradient also skips AdamW's weight decay)."""
        if time.epoch < self.settings.freeze_last_layer_epochs:
            for parameter in self.student[1].last.parameters():
                parameter.grad = None

    def after_step(self, time: TrainingTime) -> None:
        momentum = cosine_schedule(self.settings.momentum, 1.0, time.progress)
        momentum_update(self.student, self.teacher, momentum)

    def training_loss(
        self, views: list[torch.Tensor], seeds: torch.Tensor, time: TrainingTime
    ) -> torch.Tensor:
        settings = self.settings
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher(global_views).float()
        student_out = [self.student(global_views)]
        if len(views) > 2:  # local crops have their own size: one forward pass for them all
            student_out.append(self.student(torch.cat(views[2:])))
        loss = dino_loss(
            teacher_out,
            list(torch.cat(student_out).chunk(len(views))),
            self.center,
            teacher_temperature(settings, time.epoch),
            settings.student_temp,
        )
        update_center(self.center, teacher_out, settings.center_momentum)
        return loss
