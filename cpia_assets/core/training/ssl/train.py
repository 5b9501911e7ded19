"""One pre-training run from a resolved job file:
`python -m cpia_assets.core.training.ssl.train JOB.json`.

Under several devices or nodes launch it with `torchrun --nproc_per_node N [--nnodes ...]`:
Lightning's DDP then joins the processes torchrun started. Outputs in the job's `out_dir`:
`encoder.pth` (timm ViT state dict, no classifier), `encoder.json` (the job that trained it),
`timm/` (the encoder as a timm `local-dir:` model folder with a model card),
`checkpoints/last.ckpt` (and one every `checkpoint_every` steps, the newest `keep_checkpoints`
kept, each written beside its place and renamed there; a rerun resumes from last.ckpt, or from
the newest readable one when last.ckpt cannot be read), `metrics.jsonl` (loss and learning rate
per step, and the kNN accuracy at the steps `monitor.every` evaluates it: see `monitor`),
`loss_curve.png`, `knn_curve.png` (when monitored) and `summary.json` (what the asset reports).
The settings are checked before training (`preflight`) and a loss that is not finite stops the
run.
Under Dagster Pipes, rank 0 sends its progress lines to the asset's log.
"""

from __future__ import annotations

import copy
import io
import json
import math
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from cpia_assets.core.fsutil import atomic_path
from cpia_assets.core.training.datasets import count_training_images
from cpia_assets.core.training.ssl.config import (
    ENCODER_FILE,
    ENCODER_JOB_FILE,
    LAST_CHECKPOINT,
    LOSS_CURVE_FILE,
    SUMMARY_FILE,
    PretrainJob,
)
from cpia_assets.core.training.ssl.export import export_timm_folder
from cpia_assets.core.training.ssl.module import MetricsRecorder, PretrainModule
from cpia_assets.core.training.ssl.monitor import KNN_CURVE_FILE, knn_monitor
from cpia_assets.core.training.ssl.preflight import check_job
from cpia_assets.core.training.ssl.report import plot_curve


def total_steps(job: PretrainJob) -> int:
    """Optimizer steps: `steps`, or `epochs` passes over the training images."""
    settings = job.settings
    if settings.epochs <= 0:
        return settings.steps
    per_step = settings.batch_size * settings.accumulation * settings.devices * settings.nodes
    images = count_training_images(Path(job.source), job.folders)
    return max(1, math.ceil(settings.epochs * images / per_step))


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu ({torch.get_num_threads()} threads)"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary sibling and renamed into place: a crash or a full disk
    leaves the earlier file, never a truncated one, and a full disk fails as `OutputWriteError`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        buffer = io.BytesIO()  # torch.save reports a failed write only vaguely: write it ourselves
        torch.save(checkpoint, buffer)
        with atomic_path(Path(path)) as tmp:
            tmp.write_bytes(buffer.getbuffer())


def resume_point(out: Path, progress: Callable[[str], None]) -> Path | None:
    """last.ckpt, or when it is missing or unreadable the newest readable step checkpoint."""
    last = out / LAST_CHECKPOINT
    older = sorted(last.parent.glob("step-*.ckpt"), reverse=True) if last.parent.is_dir() else []
    for path in [last, *older] if last.exists() else older:
        try:
            with zipfile.ZipFile(path) as archive:  # torch's format: a zip with checksums
                broken = archive.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            broken = str(exc)
        if broken is None:
            if path != last:
                progress(f"{last} is missing or unreadable: resuming from {path.name}")
            return path
        progress(f"cannot read checkpoint {path} ({broken}); trying an older one")
    return None


def run_training(
    job: PretrainJob,
    *,
    progress: Callable[[str], None] = print,
    callbacks: Sequence[pl.Callback] = (),
    log_every: int = 10,
) -> dict[str, Any] | None:
    """Train (resuming from the last checkpoint when there is one); rank 0 writes the outputs and
    returns the summary, other ranks return None."""
    settings = job.settings
    out = Path(job.out_dir)
    check_job(job)
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    steps = total_steps(job)
    module = PretrainModule(job, steps)
    recorder = MetricsRecorder(progress, log_every)
    monitor = knn_monitor(job, module.method.export_encoder, progress)
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=out / "checkpoints", every_n_train_steps=settings.checkpoint_every,
        save_top_k=settings.keep_checkpoints, monitor="step", mode="max",  # the newest k
        save_last=True, filename="step-{step:07d}", auto_insert_metric_name=False,
    )  # fmt: skip
    distributed = settings.devices * settings.nodes > 1
    cuda = torch.cuda.is_available()
    precision = settings.precision
    if precision == "auto":
        precision = "bf16-mixed" if cuda else "32-true"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=settings.devices,
        num_nodes=settings.nodes,
        strategy="ddp" if distributed else "auto",
        sync_batchnorm=distributed and cuda,  # SyncBatchNorm needs GPUs
        precision=precision,
        max_steps=steps,
        accumulate_grad_batches=settings.accumulation,
        gradient_clip_val=settings.gradient_clip or None,
        callbacks=[recorder, *([monitor] if monitor else []), checkpoints, *callbacks],
        plugins=[AtomicCheckpointIO()],
        deterministic="warn" if cuda else True,
        use_distributed_sampler=False,  # the stream splits itself over ranks
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    resume = resume_point(out, progress)
    if resume is not None:
        progress(f"resuming from {resume}")
    trainer.fit(module, ckpt_path=resume)
    if trainer.global_rank != 0:
        return None
    knn = monitor.history if monitor else []
    return _write_outputs(job, module, recorder, knn, device_name(), precision)


def _write_outputs(
    job: PretrainJob,
    module: PretrainModule,
    recorder: MetricsRecorder,
    knn: list[dict[str, Any]],
    device: str,
    precision: str,
) -> dict[str, Any]:
    out = Path(job.out_dir)
    encoder = {k: v.detach().cpu() for k, v in module.method.export_encoder().state_dict().items()}
    with atomic_path(out / ENCODER_FILE) as tmp:
        torch.save(encoder, tmp)
    job.save(out / ENCODER_JOB_FILE)  # the evaluation labels the encoder from its own job
    export_timm_folder(copy.deepcopy(module.method.export_encoder()).cpu(), job, out)
    history = recorder.history
    knn_at = {row["step"]: {k: row[k] for k in ("knn_accuracy", "tasks")} for row in knn}
    with atomic_path(out / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(row | knn_at.get(row["step"], {}), allow_nan=False)
                               + "\n" for row in history))  # fmt: skip
    plot_curve(
        [row["step"] for row in history], [row["loss"] for row in history], out / LOSS_CURVE_FILE,
        title=f"{job.method} on {job.data}: training loss",
    )  # fmt: skip
    if knn:
        plot_curve(
            [row["step"] for row in knn], [row["knn_accuracy"] for row in knn],
            out / KNN_CURVE_FILE,
            title=f"{job.method} on {job.data}: kNN accuracy ({', '.join(knn[-1]['tasks'])})",
        )  # fmt: skip
    else:
        (out / KNN_CURVE_FILE).unlink(missing_ok=True)  # an earlier run's curve
    summary = {
        "method": job.method,
        "data": job.data,
        "model": job.settings.model,
        "image_size": job.settings.image_size,
        "steps": history[-1]["step"] if history else 0,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "images_per_s": round(recorder.images_per_s, 2),
        "device": device,
        "precision": precision,
        "encoder": str(out / ENCODER_FILE),
        "exported_initial_share": round(
            module.method.exported_initial_share(module.total_steps), 4
        ),
        "knn_accuracy": knn,  # per monitored step: mean over tasks, and each task's
    }
    with atomic_path(out / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))  # NaN is not JSON
    return summary


def main(argv: Sequence[str] | None = None, progress: Callable[[str], None] = print) -> int:
    """Train from the job file named on the command line, telling `progress` as it goes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cpia_assets.core.training.ssl.train JOB.json", file=sys.stderr)
        return 2
    run_training(PretrainJob.load(Path(args[0])), progress=progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
