"""training_shards: a data variant (`variants.py`) as WebDataset tar shards plus an index.

Layout: `shards/<variant>/shard-000000.tar, ...`, `index.json` (variant, seed, shard size,
images in total, per scale and per top folder, and per shard; what was held out for evaluation;
the export's fingerprint) and `samples.parquet` (every sample's key, path and perceptual hash:
the leak audit's view of what a model trained on this export saw). Each sample is two members,
`<key>.jpg` (the image file's bytes, never re-encoded) and `<key>.json` (`SIDECAR_FIELDS`),
with `<key>` = `<subdataset>__<scale>__<image_name>`, the name percent-encoded for "%" and "."
only (webdataset splits keys at the first dot; `sample_key`). Samples are sorted by key, then
shuffled with the seed, so sub-datasets mix in every shard.

Every variant holds out evaluation data as Mini does (`exclusions.held_out`: labelled sets'
val/test images and the exclusion rules), unless `apply_exclusions` is false; the index records
which, and the rules.

Re-exports are byte-identical: members have a fixed mtime, uid/gid 0 and no user names. A
fingerprint of the samples (sidecars, file sizes and mtimes) and settings is kept beside the
index; an export whose fingerprint matches writes nothing. Otherwise the shards are written to
a hidden staging folder and swapped in (`_swap_in`): the old export is renamed aside, the staging
folder renamed into place, then the old one deleted, so at every moment a complete export exists
under one of the two names, and the next export finishes or rolls back an interrupted swap.

Every image must be in its shard: a missing file, or one whose bytes are not a whole JPEG
(`jpeg_problem`: SOI and EOI markers and a header PIL can parse, about 50 us per 384 px image;
a full decode costs 2.3 ms) is a failure naming it; the export is then not published (the
previous one stays) and the asset fails.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, UnidentifiedImageError

from cpia_assets.core.catalog.model import Catalog, SubDataset
from cpia_assets.core.fsutil import writing
from cpia_assets.core.layout import SCALE_FOLDER_OF, SCALE_FOLDERS, DataLayout
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.stage import failure
from cpia_assets.core.training.exclusions import (
    ExclusionRule,
    Exclusions,
    ExclusionSettings,
    held_out,
    matched_rules,
    unmatched_rules,
)
from cpia_assets.core.training.variants import VARIANT_FOLDERS

STAGE = "training_shards"
MINI_VARIANT = "cpia-mini"
SCALES = ("XL", "L", "M", "S")
SIDECAR_FIELDS = (
    "image_name", "subdataset", "organ", "scale", "folder", "label", "split", "source_tile",
    "path", "licence", "redistributable", "phash",
)  # fmt: skip
INDEX_FILE = "index.json"
SAMPLES_FILE = "samples.parquet"
FINGERPRINT_FILE = ".fingerprint"
MEMBER_MTIME = 0
_EXPORT_VERSION = 3  # 3: percent-encoded sample keys


@dataclass(frozen=True)
class ShardSettings:
    shard_size: int = 10_000
    """Samples per shard (the last shard holds the rest)."""
    seed: int = 0
    exclusions: ExclusionSettings = field(default_factory=ExclusionSettings)
    apply_exclusions: bool = True
    """False also exports the held-out evaluation data: the index, every checkpoint trained on
    the export and its Table II rows say so."""

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


def sample_key(subdataset: str, scale: str, image_name: str) -> str:
    """`<subdataset>__<scale>__<image_name>` without dots, one key per name: "%" and "." of the
    name are percent-encoded (`cell.1` -> `cell%2E1`); keys and scales hold neither, nor "_"."""
    encoded = image_name.replace("%", "%25").replace(".", "%2E")
    return f"{subdataset}__{scale}__{encoded}"


def sidecar(row: Mapping[str, Any], entry: SubDataset) -> dict[str, Any]:
    """The `<key>.json` of an image record (TILES or MINI_IMAGES row) of catalog `entry`; its
    licence travels with it, and `redistributable` is false or null (unknown) where copies may
    not be shared."""
    return {
        "image_name": row["image_name"],
        "subdataset": row["subdataset"],
        "organ": entry.organ,
        "scale": row["scale"],
        "folder": SCALE_FOLDER_OF[row["scale"]],
        "label": row.get("label"),
        "split": row.get("split"),
        "source_tile": row.get("source_tile"),
        "path": row["path"],
        "licence": entry.about.licence,
        "redistributable": entry.redistributable,
        "phash": row.get("phash"),
    }


@dataclass
class VariantImages:
    """The images of a variant: `sidecars` to export, `held_out` counts per reason, the
    catalog keys whose records are missing (partition not built yet), and the exclusion rules
    that matched no image of the built partitions (`unmatched_rules`)."""

    sidecars: list[dict[str, Any]]
    held_out: Counter[str]
    missing: list[str]
    unmatched_rules: list[str] = field(default_factory=list)


def variant_sidecars(
    layout: DataLayout, catalog: Catalog, variant: str, exclusions: Exclusions | None
) -> VariantImages:
    """The sidecars of every image of `variant`, read from the per-partition records (Mini:
    `mini_images`, else the kept `tiles` of the variant's folders), less those `held_out` for
    evaluation (none when `exclusions` is None). Rules are checked for matches against every
    built partition's tiles, whatever the variant's scales."""
    table = "mini_images" if variant == MINI_VARIANT else "tiles"
    scales = [scale for scale in SCALES if SCALE_FOLDER_OF[scale] in VARIANT_FOLDERS[variant]]
    images = VariantImages([], Counter(), [])
    matched: set[ExclusionRule] = set()
    for entry in catalog.subdatasets:
        path = layout.manifest_file(entry.key, table)
        if not path.is_file():
            images.missing.append(entry.key)
            continue
        frame = pl.read_parquet(path)
        if exclusions:
            tiles = frame if table == "tiles" else _rule_columns(layout, entry.key)
            matched |= matched_rules(entry.key, tiles.iter_rows(named=True), exclusions)
        rows = frame.filter(pl.col("path").is_not_null() & pl.col("scale").is_in(scales))
        rows = list(rows.iter_rows(named=True))
        reasons = held_out(entry, rows, exclusions) if exclusions else {}
        images.held_out.update(reasons.values())
        images.sidecars += [
            sidecar(row, entry) for row in rows if (row["scale"], row["image_name"]) not in reasons
        ]
    if exclusions:
        built = [entry.key for entry in catalog.subdatasets if entry.key not in images.missing]
        images.unmatched_rules = unmatched_rules(exclusions, matched, built)
    return images


def _rule_columns(layout: DataLayout, key: str) -> pl.DataFrame:
    """The columns of a partition's tiles that exclusion rules are matched against."""
    columns = ["scale", "image_name", "source_file"]
    return pl.read_parquet(layout.manifest_file(key, "tiles"), columns=columns)


@dataclass
class ExportResult:
    index: dict[str, Any]
    written: bool  # False: the fingerprint matched, or an image failed, and nothing was written
    failures: list[dict[str, str]] = field(default_factory=list)


def export_shards(
    sidecars: Iterable[Mapping[str, Any]],
    *,
    variant: str,
    layout: DataLayout,
    settings: ShardSettings,
    held_out: Mapping[str, int] | None = None,
    executor: Executor | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write `sidecars`' images (paths relative to the data folder) as the variant's shards;
    `held_out` (images left out per reason) goes into the index."""
    samples = sorted(
        ((sample_key(s["subdataset"], s["scale"], s["image_name"]), dict(s)) for s in sidecars),
        key=lambda sample: sample[0],
    )
    duplicates = [k for k, n in Counter(k for k, _ in samples).items() if n > 1]
    if duplicates:
        raise ValueError(f"{variant}: sample keys used twice, e.g. {duplicates[:3]}")
    out_dir = layout.shards_dir(variant)
    staging, aside = _staging(out_dir), _aside(out_dir)
    _recover(out_dir, staging, aside)
    held = _held_out(settings, held_out or {})
    fingerprint = _fingerprint(samples, layout, variant, settings, held)
    previous = out_dir / FINGERPRINT_FILE
    if previous.is_file() and previous.read_text() == fingerprint:
        if progress:
            progress(f"{variant}: inputs unchanged, nothing written")
        return ExportResult(json.loads((out_dir / INDEX_FILE).read_text()), written=False)
    order = np.random.default_rng(settings.seed).permutation(len(samples))
    shuffled = [samples[i] for i in order]
    size = settings.shard_size
    with writing(out_dir):
        try:
            staging.mkdir(parents=True)
            jobs = [
                _ShardJob(staging / f"shard-{n:06d}.tar", layout.root, shuffled[i : i + size])
                for n, i in enumerate(range(0, len(shuffled), size))
            ]
            written = sorted(map_unordered(_write_shard, jobs, executor), key=lambda s: s.file)
            failures = [f for shard in written for f in shard.failures]
            restricted = sorted(
                {m["subdataset"] for _, m in samples if m.get("redistributable") is not True}
            )
            index = _index(variant, settings, written, restricted) | {
                "held_out": held,
                "fingerprint": fingerprint,
            }
            if not failures:  # an export missing images is never published
                (staging / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
                _write_samples(staging / SAMPLES_FILE, samples)
                (staging / FINGERPRINT_FILE).write_text(fingerprint)
                _swap_in(staging, out_dir, aside)
        finally:
            _recover(out_dir, staging, aside)
    if progress:
        done = "written" if not failures else f"not written: {len(failures)} images failed"
        progress(f"{variant}: {index['images']} images in {len(written)} shards, {done}")
    return ExportResult(index, written=not failures, failures=failures)


def _staging(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.staging")


def _aside(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.aside")


def _swap_in(staging: Path, out_dir: Path, aside: Path) -> None:
    """Replace `out_dir` by the complete `staging`: at every step one of `out_dir` and `aside`
    is a complete export (`_recover` puts `aside` back if a kill leaves no `out_dir`)."""
    if out_dir.exists():
        out_dir.rename(aside)
    staging.rename(out_dir)
    shutil.rmtree(aside, ignore_errors=True)


def _recover(out_dir: Path, staging: Path, aside: Path) -> None:
    """Undo what a killed export left: the old export put back when the swap stopped with it
    aside, a half-written staging folder and a finished swap's old export deleted (and the
    random-named staging folders of exports before `_swap_in`)."""
    if aside.is_dir() and not out_dir.exists():
        aside.rename(out_dir)
    for stale in (staging, aside, *out_dir.parent.glob(f".{out_dir.name}.*.tmp")):
        shutil.rmtree(stale, ignore_errors=True)


def _held_out(settings: ShardSettings, counts: Mapping[str, int]) -> dict[str, Any]:
    """The index's record of what the export held out for evaluation, and by which rules."""
    rules = Exclusions.load(settings.exclusions).texts if settings.apply_exclusions else []
    return {
        "applied": settings.apply_exclusions,
        "rules": rules,
        "images": dict(sorted(counts.items())),
    }


def _write_samples(path: Path, samples: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Every sample's key, sub-dataset, scale, path and perceptual hash (leak audit)."""
    columns = {"key": pl.String, "subdataset": pl.String, "scale": pl.String, "path": pl.String,
               "phash": pl.Int64}  # fmt: skip
    rows = [{"key": key} | {c: meta.get(c) for c in columns if c != "key"} for key, meta in samples]
    pl.DataFrame(rows, schema=columns).write_parquet(path)


@dataclass(frozen=True)
class _ShardJob:
    file: Path
    root: Path
    samples: Sequence[tuple[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class _Shard:
    file: str
    per_scale: dict[str, int]
    failures: list[dict[str, str]]


def _write_shard(job: _ShardJob) -> _Shard:
    """Worker: one tar; an image that cannot be read or is not a whole JPEG is left out with a
    failure naming it."""
    per_scale = dict.fromkeys(SCALES, 0)
    failures = []
    with tarfile.open(job.file, "w") as tar:
        for key, meta in job.samples:
            try:
                image = (job.root / meta["path"]).read_bytes()
            except OSError as exc:
                problem: str | None = f"cannot read the image: {exc}"
            else:
                problem = jpeg_problem(image)
            if problem:
                failures.append(failure(meta["path"], STAGE, f"{meta['path']}: {problem}"))
                continue
            _add(tar, f"{key}.jpg", image)
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            per_scale[meta["scale"]] += 1
    return _Shard(job.file.name, per_scale, failures)


def jpeg_problem(data: bytes) -> str | None:
    """Why `data` is not a whole JPEG (None when it is): the SOI and EOI markers, then PIL's
    parse of the header. Catches garbage, truncation and foreign files at ~50 us per 384 px
    image; damage inside the entropy-coded data needs a full decode (~2.3 ms) and passes."""
    if not (data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9")):
        return "not a whole JPEG (start or end marker missing)"
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a readable JPEG: {exc}"
    return None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MEMBER_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _index(
    variant: str, settings: ShardSettings, shards: Sequence[_Shard], restricted: list[str]
) -> dict[str, Any]:
    """The shard index; `not_redistributable` names the sub-datasets whose licence does not
    (or is not known to) allow sharing copies, so a user checks before publishing shards."""
    per_scale = dict.fromkeys(SCALES, 0)
    for shard in shards:
        for scale, count in shard.per_scale.items():
            per_scale[scale] += count
    per_folder = dict.fromkeys(SCALE_FOLDERS, 0)
    for scale, count in per_scale.items():
        per_folder[SCALE_FOLDER_OF[scale]] += count
    return {
        "variant": variant,
        "seed": settings.seed,
        "shard_size": settings.shard_size,
        "images": sum(per_scale.values()),
        "per_scale": per_scale,
        "per_folder": per_folder,
        "not_redistributable": restricted,
        "shards": [
            {"file": s.file, "images": sum(s.per_scale.values()), "per_scale": s.per_scale}
            for s in shards
        ],
    }


def _fingerprint(
    samples: Sequence[tuple[str, Mapping[str, Any]]],
    layout: DataLayout,
    variant: str,
    settings: ShardSettings,
    held: Mapping[str, Any],
) -> str:
    """Hash of the sidecars, each image file's size and mtime, the settings and what was held
    out."""
    header = [_EXPORT_VERSION, variant, asdict(settings), held]
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for key, meta in samples:
        try:
            stat = (layout.root / meta["path"]).stat()
            identity = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            identity = None  # reported when the shard is written
        digest.update(json.dumps([key, meta, identity], sort_keys=True).encode())
    return digest.hexdigest()
