"""MAE (He et al., 2022): mask most patches, encode the visible ones, reconstruct the masked ones.

The encoder is an unmodified timm ViT (its position embedding and class token included), so the
exported state dict is a plain timm checkpoint. The decoder is a few timm blocks. As in the
authors' code: fixed 2-D sin-cos position embeddings (`sincos_pos_embed`, the encoder's set by
`create_encoder`) and Xavier-uniform decoder Linears (`xavier_decoder`).
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from cpia_assets.core.training.datasets import Transform
from cpia_assets.core.training.ssl.augment import mae_views
from cpia_assets.core.training.ssl.common import TrainingTime, fix_sincos_pos_embed
from cpia_assets.core.training.ssl.config import MAESettings


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, patches, patch * patch * 3), patches in row-major order."""
    b, c, h, w = images.shape
    grid = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch**2 * c)


def masked_patches(patches: int, mask_ratio: float) -> int:
    """How many of `patches` MAE masks: at least one patch always stays visible."""
    return patches - max(1, round(patches * (1 - mask_ratio)))


def random_masking(
    batch: int, patches: int, keep: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the indices of `keep` random patches and the order that restores the
    (kept + masked) sequence to the original one."""
    shuffle = torch.rand(batch, patches, generator=generator).argsort(dim=1)
    return shuffle[:, :keep], shuffle.argsort(dim=1)


def reconstruction_loss(
    prediction: torch.Tensor, target: torch.Tensor, is_masked: torch.Tensor, norm_pix: bool
) -> torch.Tensor:
    """Mean squared error per patch (targets normalised per patch when `norm_pix`), averaged over
    the masked patches only: (B, L, P) predictions and targets, (B, L) mask of 0/1."""
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (prediction.float() - target).pow(2).mean(-1)
    return (per_patch * is_masked).sum() / is_masked.sum()


class MAE(nn.Module):
    def __init__(self, encoder: nn.Module, settings: MAESettings) -> None:
        super().__init__()
        self.encoder = encoder
        self.settings = settings
        self.patch = encoder.patch_embed.patch_size[0]
        self.prefix = encoder.num_prefix_tokens  # the class token (and registers) stay visible
        patches = encoder.patch_embed.num_patches
        dim = settings.decoder_dim
        self.decoder_embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.prefix + patches, dim))
        self.decoder_blocks = nn.Sequential(
            *(
                Block(dim, settings.decoder_heads, qkv_bias=True)
                for _ in range(settings.decoder_depth)
            )
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch**2 * 3)
        trunc_normal_(self.mask_token, std=0.02)
        if settings.sincos_pos_embed:
            fix_sincos_pos_embed(self.decoder_pos_embed, tuple(encoder.patch_embed.grid_size))
        else:
            trunc_normal_(self.decoder_pos_embed, std=0.02)
        if settings.xavier_decoder:
            for name, module in self.named_modules():
                if name.startswith("decoder") and isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)

    @staticmethod
    def views(image_size: int) -> Transform:
        return mae_views(image_size)

    def export_encoder(self) -> nn.Module:
        return self.encoder

    def exported_initial_share(self, total_steps: int) -> float:
        """MAE exports the encoder that the optimiser trains, not a momentum average."""
        return 0.0

    def adjust_gradients(self, time: TrainingTime) -> None:
        """MAE trains every part at every step."""

    def after_step(self, time: TrainingTime) -> None:
        """MAE has no teacher."""

    def training_loss(
        self, views: list[torch.Tensor], seeds: torch.Tensor, time: TrainingTime
    ) -> torch.Tensor:
        images = views[0]
        tokens = self.encoder._pos_embed(self.encoder.patch_embed(images))
        batch, length, width = tokens.shape
        patches = length - self.prefix
        keep = patches - masked_patches(patches, self.settings.mask_ratio)
        generator = torch.Generator().manual_seed(int(seeds[0]))
        kept, restore = (
            t.to(images.device) for t in random_masking(batch, patches, keep, generator)
        )
        visible = tokens[:, self.prefix :].gather(1, kept[..., None].expand(-1, -1, width))
        encoded = self.encoder.norm(
            self.encoder.blocks(
                self.encoder.norm_pre(torch.cat([tokens[:, : self.prefix], visible], 1))
            )
        )
        decoded = self.decoder_embed(encoded)
        masked = self.mask_token.expand(batch, patches - keep, -1)
        sequence = torch.cat([decoded[:, self.prefix :], masked], dim=1)
        sequence = sequence.gather(1, restore[..., None].expand(-1, -1, sequence.shape[-1]))
        decoded = torch.cat([decoded[:, : self.prefix], sequence], dim=1) + self.decoder_pos_embed
        prediction = self.decoder_pred(self.decoder_norm(self.decoder_blocks(decoded)))[
            :, self.prefix :
        ]
        is_masked = (restore >= keep).float()  # position in the shuffled order beyond the kept ones
        return reconstruction_loss(
            prediction, patchify(images, self.patch), is_masked, self.settings.norm_pix_loss
        )
