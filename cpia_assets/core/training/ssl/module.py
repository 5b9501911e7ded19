"""The Lightning side of pre-training: one LightningModule for the three methods, and a callback
that records the loss curve and throughput (kept in the checkpoint, so a resumed run continues
the same curve)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from cpia_assets.core.training.datasets import (
    StreamSlice,
    count_training_images,
    training_loader,
)
from cpia_assets.core.training.ssl.common import (
    TrainingTime,
    cosine_schedule,
    create_encoder,
    resolve_recipe,
    total_batch,
)
from cpia_assets.core.training.ssl.config import PretrainJob
from cpia_assets.core.training.ssl.dino import DINO
from cpia_assets.core.training.ssl.mae import MAE
from cpia_assets.core.training.ssl.mocov3 import MoCoV3

NO_DECAY = ("*pos_embed", "*cls_token", "*mask_token", "*reg_token")  # the decoder's too


def build_method(job: PretrainJob) -> nn.Module:
    settings = job.settings
    weights = None if settings.init == "random" else settings.init

    def encoder(drop_path: float = 0.0) -> nn.Module:
        return create_encoder(
            settings.model,
            settings.image_size,
            weights=weights,
            dynamic_size=job.method == "dino",
            drop_path=drop_path,
            sincos_pos_embed=getattr(getattr(settings, job.method), "sincos_pos_embed", False),
        )

    if job.method == "mae":
        return MAE(encoder(), settings.mae)
    if job.method == "mocov3":
        return MoCoV3(encoder(), settings.mocov3)
    return DINO(encoder, settings.dino)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1, then constant or cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class PretrainModule(pl.LightningModule):
    def __init__(self, job: PretrainJob, total_steps: int) -> None:
        super().__init__()
        self.job = job
        self.total_steps = total_steps
        self.method = build_method(job)
        self.recipe = resolve_recipe(job.settings, job.method)
        images = count_training_images(Path(job.source), job.folders)
        self.steps_per_epoch = max(1, images) / total_batch(job.settings)

    def _time(self) -> TrainingTime:
        step = self.trainer.global_step
        return TrainingTime(step / self.total_steps, step / self.steps_per_epoch)

    def training_step(
        self, batch: tuple[list[torch.Tensor], torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        views, seeds = batch
        torch.manual_seed(int(seeds[0]))  # drop-path's masks: a resumed run draws the same ones
        loss = self.method.training_loss(views, seeds, self._time())
        if not torch.isfinite(loss):  # stop before it reaches the weights, the curve or a file
            raise FloatingPointError(
                f"training loss is {float(loss.detach())} at step {self.trainer.global_step + 1}: "
                "stopping instead of training on it"
            )
        return loss

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, *args: Any, **kwargs: Any
    ) -> None:
        recipe = self.recipe
        decay = cosine_schedule(recipe.weight_decay, recipe.weight_decay_end, self._time().progress)
        for group in optimizer.param_groups:
            if group["weight_decay"]:  # timm's decayed group
                group["weight_decay"] = decay
        super().optimizer_step(epoch, batch_idx, optimizer, *args, **kwargs)
        self.method.after_step(self._time())

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        """Clip at the recipe's norm (the trainer's own setting is the same or off), then let the
        method drop gradients of parts it holds still (DINO's last layer), in DINO's order."""
        if self.recipe.gradient_clip:
            self.clip_gradients(optimizer, self.recipe.gradient_clip, "norm")
        self.method.adjust_gradients(self._time())

    def configure_optimizers(self) -> dict[str, Any]:
        settings, recipe = self.job.settings, self.recipe
        # Biases, norms, position embeddings and tokens are not decayed; frozen parts left out.
        groups = param_groups_weight_decay(
            self.method, recipe.weight_decay, no_weight_decay_list=NO_DECAY
        )
        optimizer = torch.optim.AdamW(
            groups,
            lr=recipe.base_lr,
            betas=(recipe.beta1, recipe.beta2),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(
                step,
                warmup=settings.warmup_steps,
                total=self.total_steps,
                schedule=settings.schedule,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # Called after a checkpoint is restored: a resumed run starts at the next unseen batch.
        settings = self.job.settings
        return training_loader(
            Path(self.job.source),
            transform=self.method.views(settings.image_size),
            batch_size=settings.batch_size,
            seed=settings.seed,
            folders=self.job.folders,
            workers=settings.workers,
            stream_slice=StreamSlice(
                rank=self.global_rank,
                world_size=self.trainer.world_size,
                start_batch=self.trainer.global_step * settings.accumulation,
            ),
        )


class MetricsRecorder(pl.Callback):
    """Loss and learning rate per optimizer step, and images/s of this process's training."""

    def __init__(self, progress: Callable[[str], None], log_every: int) -> None:
        self.progress = progress
        self.log_every = log_every
        self.history: list[dict[str, float]] = []
        self._window_loss = 0.0
        self._images = 0
        self._started: float | None = None
        self.images_per_s = 0.0
        self._recorded_step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "images_per_s": self.images_per_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run continues the curve; a finished one rerun keeps its measured speed."""
        self.history = list(state_dict["history"])
        self.images_per_s = state_dict["images_per_s"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recorded_step = trainer.global_step  # restored when resuming

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._window_loss += float(outputs["loss"])  # already divided by the accumulation
        step = trainer.global_step
        if step == self._recorded_step:  # still accumulating gradients
            return
        self._recorded_step = step
        now = time.perf_counter()
        if self._started is None:  # the first step includes start-up: time from its end
            self._started = now
        else:
            self._images += batch[1].numel() * trainer.accumulate_grad_batches * trainer.world_size
            self.images_per_s = self._images / (now - self._started)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.history.append({"step": step, "loss": self._window_loss, "lr": lr})
        self._window_loss = 0.0
        if step % self.log_every == 0 or step == trainer.max_steps:
            self.progress(f"step {step}/{trainer.max_steps} loss {self.history[-1]['loss']:.4f} "
                          f"lr {lr:.2e} {self.images_per_s:.1f} images/s")  # fmt: skip
