"""Pieces shared by the methods: the timm encoder, its weights, momentum teachers, schedules and
the optimiser recipe resolved from the settings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

from cpia_assets.core.training.ssl.config import OptimizerRecipe, PretrainSettings


@dataclass(frozen=True)
class TrainingTime:
    """Where training stands before an optimizer step: the methods' schedules follow it."""

    progress: float  # fraction of the run's optimizer steps done
    epoch: float  # passes over the training images done


def total_batch(settings: PretrainSettings) -> int:
    """Images per optimizer step over all devices and nodes."""
    return settings.batch_size * settings.accumulation * settings.devices * settings.nodes


def resolve_recipe(settings: PretrainSettings, method: str) -> OptimizerRecipe:
    """The method's optimiser recipe with PretrainSettings' non-zero overrides, `base_lr` turned
    into the peak learning rate (linear scaling by the total batch when `scale_lr`). An
    overridden weight decay keeps the method's schedule shape (constant, or rising to its end)."""
    recipe: OptimizerRecipe = getattr(settings, method)
    base_lr = settings.lr or recipe.base_lr
    weight_decay = settings.weight_decay or recipe.weight_decay
    constant = recipe.weight_decay_end == recipe.weight_decay
    return OptimizerRecipe(
        base_lr=base_lr * total_batch(settings) / 256 if settings.scale_lr else base_lr,
        weight_decay=weight_decay,
        weight_decay_end=weight_decay if constant else recipe.weight_decay_end,
        beta1=recipe.beta1,
        beta2=recipe.beta2,
        gradient_clip=settings.gradient_clip or recipe.gradient_clip,
    )


def create_encoder(
    name: str,
    image_size: int,
    *,
    weights: str | Path | None = None,
    dynamic_size: bool = False,
    drop_path: float = 0.0,
    sincos_pos_embed: bool = False,
) -> nn.Module:
    """A timm ViT without classifier (`num_classes=0`), randomly initialised or from a local file.

    `dynamic_size` lets it take crops smaller than `image_size` (DINO's local crops). Nothing is
    downloaded: `weights` is a local timm-style state dict (e.g. ImageNet-1k weights).
    `sincos_pos_embed` fixes the position embedding (frozen): 2-D sin-cos, or the one `weights`
    bring (their training relied on it).
    """
    encoder = timm.create_model(
        name,
        num_classes=0,
        img_size=image_size,
        dynamic_img_size=dynamic_size,
        drop_path_rate=drop_path,
    )
    if sincos_pos_embed:
        fix_sincos_pos_embed(encoder.pos_embed, tuple(encoder.patch_embed.grid_size))
    if weights:
        load_encoder_weights(encoder, Path(weights))
    return encoder


@torch.no_grad()
def fix_sincos_pos_embed(pos_embed: nn.Parameter, grid: tuple[int, int]) -> None:
    """Fill a (1, prefix + H * W, D) position embedding with 2-D sin-cos over the `grid`, zero
    for the prefix (class) tokens, and freeze it."""
    pos_embed.zero_()
    patches = grid[0] * grid[1]
    pos_embed[0, -patches:] = build_sincos2d_pos_embed(list(grid), pos_embed.shape[-1])
    pos_embed.requires_grad = False


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (.pth/.bin/.safetensors; a `state_dict` or `model`
    wrapper is opened); anything else is a ValueError naming the file."""
    try:
        if path.suffix == ".safetensors":  # the format of timm's weights on the Hugging Face hub
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler fails on other bytes in many ways (KeyError: 101)
        first_line = next(iter(str(exc).splitlines()), "")
        raise ValueError(
            f"{path}: cannot read the weights file ({type(exc).__name__}: {first_line})"
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping):
            state = state.get(wrapper, state)
    if not (
        isinstance(state, Mapping)
        and state
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(f"{path}: not a weights file (a state dict of named tensors)")
    return dict(state)


def load_encoder_weights(encoder: nn.Module, path: Path) -> None:
    """Load a timm ViT state dict (`read_weights`), dropping its classifier and resampling the
    position embedding to the encoder's grid; any other mismatch is an error naming the file."""
    state = read_weights(path)
    expected = encoder.state_dict()
    state = {key.removeprefix("module."): value for key, value in state.items()}
    state = {k: v for k, v in state.items() if k in expected or not k.startswith("head.")}
    if "pos_embed" in state and state["pos_embed"].shape != encoder.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=list(encoder.patch_embed.grid_size),
            num_prefix_tokens=encoder.num_prefix_tokens,
        )
    problems = [f"missing {key}" for key in expected if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in expected]
    problems += [
        f"{key} has shape {tuple(value.shape)}, the encoder {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise ValueError(f"{path}: does not match the encoder: {shown}")
    encoder.load_state_dict(state)


def frozen_copy(source: nn.Module, target: nn.Module) -> nn.Module:
    """`target` (built like `source`) holding `source`'s weights, without gradients: a momentum
    teacher. Built separately because weight-normed layers cannot be deep-copied."""
    target.load_state_dict(source.state_dict())
    for parameter in target.parameters():
        parameter.requires_grad = False
    return target


@torch.no_grad()
def momentum_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over the parameters (the
    teacher's normalisation statistics are its own)."""
    for ours, theirs in zip(teacher.parameters(), student.parameters(), strict=True):
        ours.mul_(momentum).add_(theirs.detach(), alpha=1 - momentum)


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """From `start` to `end` along a half cosine over training (teacher momentum, DINO's weight
    decay)."""
    return end + (start - end) * (math.cos(math.pi * min(progress, 1.0)) + 1) / 2


def gather_batches(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' `tensor` concatenated (no gradient) and this rank's offset in it; itself when
    not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor, 0
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts), torch.distributed.get_rank() * tensor.shape[0]


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        tensor /= torch.distributed.get_world_size()
    return tensor
