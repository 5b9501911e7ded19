"""Benchmark: does pre-training on CPIA-Mini learn? MAE, DINO and MoCo-v3 on the demo build, each
judged by kNN and a linear probe of its frozen encoder against the random-init encoder.

    make demo                                     # builds data/ (Mini shards, the demo cells)
    .venv/bin/python benchmarks/bench_ssl_methods.py              # 100 steps per method
    .venv/bin/python benchmarks/bench_ssl_methods.py --steps 40   # a quick look

Every method trains through the platform's own path (`run_training`: the Mini WebDataset shards
of the demo build, Lightning, each method's recipe) for the same number of steps on a small ViT
(vit_tiny, 64 px), its heads shrunk to suit it (printed). The evaluation is the platform's too
(`frozen_predictions`): kNN (k = 20, cosine, temperature 0.07) and a linear probe (BatchNorm
without affine + linear) of the frozen encoder, on the demo cells task read from its records:
features of its train split fit, its test split scores. Mini and the shards never hold the
task's val/test images (the export's `held_out`), so the score is clean. Each method is compared
with random init on the same test images: the exact two-sided McNemar test on the images that
one of the two gets right and the other wrong. The random-init row
is the same architecture with the evaluation's seeded initial weights. Each method's
learning rate is its recipe's `base_lr` unless `--lr` gives one (per 256 images, scaled by the
batch); the defaults below were chosen for this tiny schedule and are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from scipy.stats import binomtest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpia_assets.core.catalog.loading import load_catalog  # noqa: E402
from cpia_assets.core.layout import DataLayout  # noqa: E402
from cpia_assets.core.training.shards import MINI_VARIANT  # noqa: E402
from cpia_assets.core.training.ssl.config import (  # noqa: E402
    ENCODER_FILE,
    METHOD_NAMES,
    DINOSettings,
    FinetuneSettings,
    MAESettings,
    MoCoSettings,
    PretrainJob,
    PretrainSettings,
    export_identity,
    training_source,
)
from cpia_assets.core.training.ssl.evaluate import (  # noqa: E402
    frozen_predictions,
    prediction_scores,
)
from cpia_assets.core.training.ssl.tasks import load_task  # noqa: E402
from cpia_assets.core.training.ssl.train import run_training  # noqa: E402

LEARNING_RATES = {"mae": 0.008, "dino": 0.002, "mocov3": 0.004}
"""Per 256 images: peaks of 1e-3 (MAE), 2.5e-4 (DINO) and 5e-4 (MoCo-v3) at batch 32."""
SMALL_HEADS = {
    "mae": MAESettings(decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "dino": DINOSettings(hidden_dim=512, bottleneck_dim=128, out_dim=4096, local_crops=4,
                         local_crop_fraction=0.5, teacher_temp_warmup_epochs=5),
    "mocov3": MoCoSettings(hidden_dim=1024, out_dim=128),
}  # fmt: skip
"""Heads sized for vit_tiny, DINO's local crops 32 px (2 x 2 patches; the reference's 96/224 would
leave one 16 px patch at 64 px); every other recipe value is the reference default."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = Path(os.environ.get("CPIA_DATA_DIR", REPO / "data"))
    parser.add_argument("--data", type=Path, default=default_data, help="a `make demo` build")
    parser.add_argument("--task", default="demo-roi-cells", help="a labelled demo sub-dataset")
    parser.add_argument("--methods", default="mae,dino,mocov3")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--lr", type=float, default=0.0, help="per 256 images, every method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    layout = DataLayout(args.data)
    try:
        source, folders = training_source(layout, MINI_VARIANT)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"{exc}\nbuild the demo first: make demo") from exc
    fingerprint, held_out = export_identity(source)
    task = load_task(args.task, args.task, layout=layout, catalog=load_catalog("demo"))
    evaluation = FinetuneSettings(
        image_size=args.image_size, batch_size=64, workers=0, seed=args.seed,
        baseline_model=args.model,
    )  # fmt: skip
    sizes = {split: len(items) for split, items in task.splits.items()}
    applied = "applied" if held_out.get("applied") else "NOT applied"
    print(f"task {args.task}: classes {task.classes}, images {sizes}; pre-training on "
          f"{source} (exclusions {applied}), {args.model} at {args.image_size} px, "
          f"batch {args.batch}, {args.steps} steps, seed {args.seed}")  # fmt: skip
    truth, baseline = frozen_predictions(task, model=args.model, weights=None, settings=evaluation)
    rows: list[tuple[str, float | None, dict[str, list[int]]]] = [("random init", None, baseline)]
    with tempfile.TemporaryDirectory(prefix="bench-ssl-") as work:
        for method in args.methods.split(","):
            lr = args.lr or LEARNING_RATES[method]
            settings = replace(
                PretrainSettings(
                    model=args.model, image_size=args.image_size, batch_size=args.batch,
                    steps=args.steps, warmup_steps=max(1, args.steps // 10), lr=lr,
                    workers=1, checkpoint_every=10**9, seed=args.seed,
                ),
                **{method: SMALL_HEADS[method]},
            )  # fmt: skip
            out = Path(work) / method
            job = PretrainJob(method, MINI_VARIANT, str(source), folders, str(out), settings,
                              fingerprint, held_out)  # fmt: skip
            started = time.monotonic()
            summary = run_training(job, progress=lambda line: None)
            elapsed = time.monotonic() - started
            loss = summary["final_loss"] if summary else float("nan")
            print(f"{METHOD_NAMES[method]}: lr {lr} per 256, {elapsed:.0f} s, "
                  f"final loss {loss:.4f}, {SMALL_HEADS[method]}", flush=True)  # fmt: skip
            _, predictions = frozen_predictions(
                task, model=args.model, weights=out / ENCODER_FILE, settings=evaluation
            )
            rows.append((METHOD_NAMES[method], elapsed, predictions))
    _print_table(rows, truth, len(task.classes))


def _print_table(rows: list, truth: list[int], classes: int) -> None:
    """Accuracy (macro F1) per encoder and frozen evaluation, and each gain over random init
    with the exact McNemar test on the same test images (paired: only the images that one of
    the two gets right and the other wrong count)."""
    baseline = rows[0][2]
    print(f"\nTest split of the demo task, n = {len(truth)} images, {classes} classes "
          f"(chance {100 / classes:.0f}%). Accuracy % (macro F1 %); gain = points over random "
          "init, p = exact two-sided McNemar test against it on the same images")  # fmt: skip
    print("| encoder | pre-training s | kNN | linear probe | kNN gain (p) | linear gain (p) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, predictions in rows:
        cells, gains = [], []
        for metric in ("knn", "linear_probe"):
            scores = prediction_scores(truth, predictions[metric], classes)
            cells.append(f"{100 * scores['accuracy']:.1f} ({100 * scores['macro_f1']:.1f})")
            gains.append(_paired_gain(truth, predictions[metric], baseline[metric]))
        took = "-" if seconds is None else f"{seconds:.0f}"
        print(f"| {name} | {took} | {cells[0]} | {cells[1]} | {gains[0]} | {gains[1]} |")


def _paired_gain(truth: list[int], ours: list[int], theirs: list[int]) -> str:
    """Accuracy points of `ours` over `theirs` and the exact McNemar p-value."""
    ours_right = [o == t for o, t in zip(ours, truth, strict=True)]
    theirs_right = [o == t for o, t in zip(theirs, truth, strict=True)]
    only_ours = sum(a and not b for a, b in zip(ours_right, theirs_right, strict=True))
    only_theirs = sum(b and not a for a, b in zip(ours_right, theirs_right, strict=True))
    gain = 100 * (only_ours - only_theirs) / len(truth)
    if only_ours + only_theirs == 0:
        return f"{gain:+.1f} (-)"
    p = binomtest(only_ours, only_ours + only_theirs, 0.5).pvalue
    return f"{gain:+.1f} ({p:.2g})"


if __name__ == "__main__":
    main()
