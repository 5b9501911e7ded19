"""MoCo-v3 (Chen et al., 2021): a query encoder with projection and prediction MLPs matches a
momentum encoder's keys of the other view, with a symmetric InfoNCE loss. The ViT stability
tricks of the paper: a frozen random patch projection (`frozen_patch_embed`) and a fixed sin-cos
position embedding (`sincos_pos_embed`, set by `create_encoder`)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cpia_assets.core.training.datasets import Transform
from cpia_assets.core.training.ssl.augment import moco_views
from cpia_assets.core.training.ssl.common import (
    TrainingTime,
    cosine_schedule,
    frozen_copy,
    gather_batches,
    momentum_update,
)
from cpia_assets.core.training.ssl.config import MoCoSettings


def mlp(in_dim: int, hidden: int, out: int, layers: int, last_bn: bool) -> nn.Sequential:
    """Linear-BN-ReLU blocks, the last Linear followed by an affine-free BN when `last_bn`."""
    modules: list[nn.Module] = []
    for layer in range(layers):
        first, last = in_dim if layer == 0 else hidden, out if layer == layers - 1 else hidden
        modules.append(nn.Linear(first, last, bias=False))
        if layer < layers - 1:
            modules += [nn.BatchNorm1d(last), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(last, affine=False))
    return nn.Sequential(*modules)


class MoCoV3(nn.Module):
    def __init__(self, encoder: nn.Module, settings: MoCoSettings) -> None:
        super().__init__()
        self.settings = settings
        hidden, out = settings.hidden_dim, settings.out_dim
        self.base = nn.Sequential(encoder, mlp(encoder.embed_dim, hidden, out, 3, last_bn=True))
        self.predictor = mlp(out, hidden, out, 2, last_bn=settings.predictor_last_bn)
        if settings.frozen_patch_embed:
            encoder.patch_embed.proj.requires_grad_(False)
        self.momentum = frozen_copy(self.base, copy.deepcopy(self.base))

    @staticmethod
    def views(image_size: int) -> Transform:
        return moco_views(image_size)

    def export_encoder(self) -> nn.Module:
        return self.base[0]

    def exported_initial_share(self, total_steps: int) -> float:
        """MoCo-v3 exports the encoder that the optimiser trains, not a momentum average."""
        return 0.0

    def adjust_gradients(self, time: TrainingTime) -> None:
        """MoCo-v3 trains every trainable part at every step."""

    def after_step(self, time: TrainingTime) -> None:
        momentum = cosine_schedule(self.settings.momentum, 1.0, time.progress)
        momentum_update(self.base, self.momentum, momentum)

    def training_loss(
        self, views: list[torch.Tensor], seeds: torch.Tensor, time: TrainingTime
    ) -> torch.Tensor:
        first, second = views
        q1, q2 = self.predictor(self.base(first)), self.predictor(self.base(second))
        with torch.no_grad():
            k1, k2 = self.momentum(first), self.momentum(second)
        temperature = self.settings.temperature
        return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)


def contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: each query's positive is the key of the same image; all keys of all ranks are the
    negatives. Scaled by 2 * temperature as in the paper."""
    keys, offset = gather_batches(F.normalize(keys.float(), dim=1))
    logits = F.normalize(queries.float(), dim=1) @ keys.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, labels) * 2 * temperature
