"""Benchmark: can the loader feed SSL training on CPU? Images/s per core, in one run, for
reading + decoding 384 px JPEGs from folders and from WebDataset shards, the same with MAE's
augmentation, and MAE training steps (vit_tiny at 224 by default, decoder 2 x 128) on ready
tensors.

    .venv/bin/python benchmarks/bench_ssl_loader.py            # 512 images, 10 training steps
    .venv/bin/python benchmarks/bench_ssl_loader.py --smoke    # 32 images, 2 steps

Every figure is one process on one core (torch limited to one thread), so "images/s per core"
compares directly: the loader is the bottleneck when its per-core rate times the cores given to
loading is below the training rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for cpia_assets_tests.support.ssl_data

from cpia_assets.core.training.datasets import training_loader  # noqa: E402
from cpia_assets.core.training.ssl.augment import mae_views  # noqa: E402
from cpia_assets.core.training.ssl.common import TrainingTime, create_encoder  # noqa: E402
from cpia_assets.core.training.ssl.config import MAESettings  # noqa: E402
from cpia_assets.core.training.ssl.mae import MAE  # noqa: E402
from cpia_assets_tests.support.ssl_data import write_folder_tree, write_shards  # noqa: E402


def decode_only(image: object) -> list[torch.Tensor]:
    return [torch.zeros(1)]  # the loader has decoded the JPEG to RGB already


def loader_rate(source: Path, transform: object, images: int, batch: int = 32) -> float:
    iterator = iter(training_loader(source, transform=transform, batch_size=batch, seed=0))
    next(iterator)  # warm-up: file listing, first reads
    started, seen = time.perf_counter(), 0
    while seen < images:
        seen += len(next(iterator)[1])
    return seen / (time.perf_counter() - started)


def training_rate(model: str, image_size: int, batch: int, steps: int) -> float:
    small_decoder = MAESettings(decoder_dim=128, decoder_depth=2, decoder_heads=4)
    mae = MAE(create_encoder(model, image_size), small_decoder)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-4)
    images, seeds = torch.randn(batch, 3, image_size, image_size), torch.arange(batch)
    for step in range(steps + 1):
        if step == 1:  # the first step allocates: time the rest
            started = time.perf_counter()
        loss = mae.training_loss([images], seeds, TrainingTime(progress=0.0, epoch=0.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="384 px JPEGs to read")
    parser.add_argument("--steps", type=int, default=10, help="MAE training steps")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.steps = 32, 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "cpia-mini"
        write_folder_tree(root, per_scale=max(1, args.images // 4))
        write_shards(root, Path(work) / "shards", shard_size=256)
        rows = [
            ("read + decode, folders", loader_rate(root, decode_only, args.images)),
            ("read + decode, shards", loader_rate(Path(work) / "shards", decode_only, args.images)),
            ("+ MAE augmentation (224), folders", loader_rate(root, mae_views(224), args.images)),
            ("+ MAE augmentation (224), shards",
             loader_rate(Path(work) / "shards", mae_views(224), args.images)),
        ]  # fmt: skip
        training = training_rate(args.model, 224, args.batch, args.steps)
    rows.append((f"MAE training, {args.model} at 224, batch {args.batch}", training))
    print(f"{'images/s per core':<48}{'rate':>10}")
    for name, rate in rows:
        print(f"{name:<48}{rate:>10.1f}")
    feeding = min(rate for name, rate in rows if "augmentation" in name)
    verdict = "is" if training > feeding else "is not"
    print(f"\nloader cores per training core to keep up: {training / feeding:.2f}; with one each, "
          f"the loader {verdict} the bottleneck")  # fmt: skip


if __name__ == "__main__":
    main()
