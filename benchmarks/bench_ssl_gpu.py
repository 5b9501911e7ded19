"""Benchmark: MAE ViT-B/16 pre-training at 224 px, bf16, batch 256, through the real training
path (loader, Lightning, checkpoints off) on demo images; prints images/s and peak GPU memory.

    .venv/bin/python benchmarks/bench_ssl_gpu.py                 # on CUDA: 300 steps
    .venv/bin/python benchmarks/bench_ssl_gpu.py --data DIR      # a cpia-mini/ folder or shards
    .venv/bin/python benchmarks/bench_ssl_gpu.py --smoke         # CPU: vit_tiny, 64 px, 3 steps

Public anchor: about 185-313 images/s per A100 for MAE ViT-B/16 pre-training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for cpia_assets_tests.support.ssl_data

from cpia_assets.core.training.ssl.config import MAESettings, PretrainJob, PretrainSettings  # noqa: E402
from cpia_assets.core.training.ssl.train import run_training  # noqa: E402
from cpia_assets_tests.support.ssl_data import write_folder_tree  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--data", type=Path, help="training images (default: generated crops)")
    parser.add_argument("--smoke", action="store_true", help="CPU, vit_tiny, 64 px, 3 steps")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    settings = PretrainSettings(
        model="vit_base_patch16_224", image_size=224, batch_size=args.batch, steps=args.steps,
        warmup_steps=min(50, args.steps), workers=args.workers, checkpoint_every=10**9,
        precision="bf16-mixed",
    )  # fmt: skip
    if args.smoke:
        settings = PretrainSettings(
            model="vit_tiny_patch16_224", image_size=64, batch_size=4, steps=3, warmup_steps=1,
            workers=0, checkpoint_every=10**9, precision="32-true",
            mae=MAESettings(decoder_dim=64, decoder_depth=1, decoder_heads=2),
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        data = args.data
        if data is None:
            data = Path(work) / "cpia-mini"
            write_folder_tree(data, per_scale=64 if not args.smoke else 2)
        job = PretrainJob("mae", "benchmark", str(data), ("L", "M", "S"), str(Path(work) / "out"),
                          settings)  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        summary = run_training(job, progress=lambda line: None)
    assert summary is not None
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    figures = {
        "model": settings.model, "image_size": settings.image_size, "batch": settings.batch_size,
        "steps": summary["steps"], "precision": summary["precision"], "device": summary["device"],
        "images_per_s": summary["images_per_s"], "peak_gpu_memory_gib": peak and round(peak, 2),
        "final_loss": summary["final_loss"],
    }  # fmt: skip
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
