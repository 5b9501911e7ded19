"""Small training sets for the SSL tests: a CPIA-style folder tree of real-looking 384 px JPEGs
(crops of a real slide) and WebDataset shards of it written as the contract specifies."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import openslide
import polars as pl
import pytorch_lightning as lightning
import webdataset as wds
from PIL import Image

from cpia_assets.core.layout import SCALE_FOLDER_OF, DataLayout
from cpia_assets.core.perceptual import phash_file
from cpia_assets.core.synthetic import generate_source
from cpia_assets.core.training.exclusions import DEFAULT_EXCLUSIONS
from cpia_assets.core.training.shards import SAMPLES_FILE
from cpia_assets.core.training.ssl.config import (
    DINOSettings,
    MAESettings,
    MoCoSettings,
    PretrainSettings,
)
from cpia_assets_tests.support.paths import TESTDATA

SLIDE = TESTDATA / "CMU-1-Small-Region.svs"
SCALES = ("XL", "L", "M", "S")


def write_folder_tree(root: Path, per_scale: int = 4, size: int = 384, seed: int = 0) -> list[Path]:
    """`root/{L,M,S}/<sub-dataset>/*.jpg`: `per_scale` crops of the test slide for each scale
    (XL and L under L), two sub-datasets."""
    rng = random.Random(seed)
    written = []
    with openslide.OpenSlide(SLIDE) as slide:
        width, height = slide.dimensions
        for scale in SCALES:
            for number in range(per_scale):
                key = f"demo-{number % 2}"
                x, y = rng.randrange(width - size), rng.randrange(height - size)
                crop = slide.read_region((x, y), 0, (size, size)).convert("RGB")
                path = root / SCALE_FOLDER_OF[scale] / key / f"tile-{scale}-{number:03d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                crop.save(path, quality=85)
                written.append(path)
    return written


def write_shards(root: Path, shards: Path, *, shard_size: int, seed: int = 0) -> dict:
    """Shards of a folder tree written by `write_folder_tree`, with the contract's index.json
    (held out: nothing, by the default rules) and samples.parquet (real perceptual hashes)."""
    images = sorted(root.glob("*/*/*.jpg"))
    random.Random(seed).shuffle(images)
    shards.mkdir(parents=True, exist_ok=True)
    index: dict = {"variant": "test", "seed": seed, "shard_size": shard_size, "images": 0,
                   "per_scale": dict.fromkeys(SCALES, 0), "per_folder": dict.fromkeys("LMS", 0),
                   "shards": [], "held_out": {"applied": True, "rules": list(DEFAULT_EXCLUSIONS),
                   "images": {}}}  # fmt: skip
    samples = []
    for number in range(0, len(images), shard_size):
        name = f"shard-{number // shard_size:06d}.tar"
        per_scale = dict.fromkeys(SCALES, 0)
        with wds.TarWriter(str(shards / name)) as writer:
            for path in images[number : number + shard_size]:
                scale = path.stem.split("-")[1]
                meta = {"image_name": path.stem, "subdataset": path.parent.name, "organ": "breast",
                        "scale": scale, "folder": SCALE_FOLDER_OF[scale], "label": None,
                        "split": "none", "source_tile": None,
                        "path": path.relative_to(root.parent).as_posix()}  # fmt: skip
                key = f"{path.parent.name}__{scale}__{path.stem}".replace(".", "_")
                writer.write({"__key__": key, "jpg": path.read_bytes(), "json": meta})
                samples.append({"key": key, "subdataset": meta["subdataset"], "scale": scale,
                                "path": meta["path"], "phash": phash_file(path)})  # fmt: skip
                per_scale[scale] += 1
                index["per_scale"][scale] += 1
                index["per_folder"][SCALE_FOLDER_OF[scale]] += 1
                index["images"] += 1
        index["shards"].append(
            {"file": name, "images": sum(per_scale.values()), "per_scale": per_scale}
        )
    pl.DataFrame(samples).write_parquet(shards / SAMPLES_FILE)
    index["fingerprint"] = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
    (shards / "index.json").write_text(json.dumps(index))
    return index


def corrupt_shard_sample(shard: Path, name_part: str = "") -> None:
    """Overwrite, in place, the JPEG of the shard's first sample whose name holds `name_part` with
    zeros: not an image."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg") and name_part in m.name)
    with shard.open("r+b") as file:
        file.seek(member.offset_data)
        file.write(bytes(member.size))


def truncate_shard(shard: Path, keep: int) -> list[str]:
    """Rewrite the shard as a valid tar of its first `keep` samples (its index unchanged: the
    shard is now shorter than the index says); returns the keys of the samples dropped."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]
    keys = list(dict.fromkeys(m.name.partition(".")[0] for m, _ in members))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.partition(".")[0] in keys[:keep]:
                tar.addfile(member, io.BytesIO(data))
    return keys[keep:]


def corrupt_jpeg(path: Path) -> None:
    """Keep the JPEG header, cut the data: decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[:200])


def image_bytes(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def tiny_settings(**overrides: object) -> PretrainSettings:
    """vit_tiny at 64 px with small heads: a few seconds per dozen steps on one CPU core."""
    values: dict = {
        "model": "vit_tiny_patch16_224", "image_size": 64, "batch_size": 8, "steps": 12,
        "lr": 1e-3 * 256 / 8, "warmup_steps": 2, "workers": 0, "checkpoint_every": 6,
        "mae": MAESettings(decoder_dim=64, decoder_depth=1, decoder_heads=2),
        "dino": DINOSettings(hidden_dim=128, bottleneck_dim=32, out_dim=256, local_crops=2,
                             momentum=0.9),
        "mocov3": MoCoSettings(hidden_dim=128, out_dim=32, momentum=0.9),
    }  # fmt: skip
    return PretrainSettings(**(values | overrides))


def labelled_task(dest: Path, per_split: dict[str, int], seed: int = 31) -> Path:
    """A labelled ROI set like the demo's: `<split>/<class>/` images, assorted sizes and formats."""
    spec = {"recipe": "roi", "layout": "folders", "classes": ["lymphocyte", "neutrophil"],
            "per_split": per_split, "seed": seed}  # fmt: skip
    generate_source(spec, dest)
    return dest


def built_catalog_task(layout: DataLayout, key: str, per_split: dict[str, int]) -> list[dict]:
    """A labelled catalog sub-dataset as if built: `labelled_task`'s images under the data folder
    and its records (`path`, `label`, `split`); returns the records."""
    source = labelled_task(layout.root / ".source" / key, per_split)
    rows = []
    for path in sorted(source.rglob("*.*")):
        stored = layout.root / "cpia" / key / path.relative_to(source)
        stored.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, stored)
        split, label = path.parts[-3:-1]
        rows.append({"path": layout.relative(stored), "label": label, "split": split})
    records = layout.manifest_file(key, "tiles")
    records.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(records)
    return rows


class Interrupt(Exception):
    """Raised by InterruptAt: a training run that stops as a crash would."""


class InterruptAt(lightning.Callback):
    """Simulates a crash after optimizer step `step` (its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: lightning.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise Interrupt
