"""training_shards: a data variant (`variants.py`) as WebDataset tar shards plus an index.

Layout: `shards/<variant>/shard-000000.tar, ...`, `index.json` (variant, seed, shard size,
images in total, per scale and per top folder, and per shard; what was held out for evaluation;
the export's fingerprint) and `samples.parquet` (every sample's key, path and perceptual hash:
the leak audit's view of what a model trained on this export saw). Each sample is two members,
`<key>.jpg` (the image file's bytes, never re-encoded) and `<key>.json` (`SIDECAR_FIELDS`),
with `<key>` = `<subdataset>__<scale>__<image_name>`, the name percent-encoded for "%" and "."
only (webdataset splits keys at the first dot; `sample_key`). Samples are shuffled with the
seed (ordered by the MD5 of `<seed>:<key>`, `shuffle_order`), so sub-datasets mix in every shard.

Memory stays flat however many samples (21 M for the full `cpia` variant): the records are
read `BATCH_ROWS` at a time into a `Selection`, a DuckDB file beside the shards whose sorts
spill to disk, and read back in batches, in key order (duplicate keys, fingerprint,
`samples.parquet`) and in shuffle order (the shards, a few at a time).

Every variant holds out evaluation data as Mini does (`exclusions.held_out`: labelled sets'
val/test images and the exclusion rules), unless `apply_exclusions` is false; the index records
which, and the rules.

Re-exports are byte-identical: members have a fixed mtime, uid/gid 0 and no user names. A
fingerprint of the samples in key order (sidecars, file sizes and mtimes) and settings is kept
beside the index; an export whose fingerprint matches writes nothing. Otherwise the shards are
written to a hidden staging folder and swapped in (`_swap_in`): the old export is renamed
aside, the staging folder renamed into place, then the old one deleted, so at every moment a
complete export exists under one of the two names, and the next export finishes or rolls back
an interrupted swap.

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
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

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
    identity,
    matched_rules,
    unmatched_rules,
)
from cpia_assets.core.training.selection import BATCH_ROWS as BATCH_ROWS  # re-exported
from cpia_assets.core.training.selection import (
    Selection,
    record_batches,
    remove_dead_selections,
)
from cpia_assets.core.training.selection import sample_key as sample_key  # re-exported
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
_EXPORT_VERSION = 4  # 3: percent-encoded sample keys; 4: streamed, shuffled by MD5 of seed and key


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
    """The images of a variant: `sidecars` to export (a `Selection` on disk, streamed in
    batches), `held_out` counts per reason, the catalog keys whose records are missing
    (partition not built yet), and the exclusion rules that matched no image of the built
    partitions (`unmatched_rules`)."""

    sidecars: Selection
    held_out: Counter[str]
    missing: list[str]
    unmatched_rules: list[str] = field(default_factory=list)


_RECORD_COLUMNS = ("image_name", "subdataset", "scale", "label", "split", "source_tile", "path",
                   "phash", "source_file")  # fmt: skip
"""What `sidecar` and `held_out` read of a record; a column a file lacks reads as None."""
_RULE_COLUMNS = ("scale", "image_name", "source_file")
"""The columns of a partition's tiles that exclusion rules are matched against."""


def variant_sidecars(
    layout: DataLayout,
    catalog: Catalog,
    variant: str,
    exclusions: Exclusions | None,
    *,
    batch_rows: int | None = None,
) -> VariantImages:
    """The sidecars of every image of `variant`, read from the per-partition records (Mini:
    `mini_images`, else the kept `tiles` of the variant's folders), less those `held_out` for
    evaluation (none when `exclusions` is None). Rules are checked for matches against every
    built partition's tiles, whatever the variant's scales.

    The records are read `batch_rows` rows at a time into a `Selection` (a DuckDB file beside
    the shards), so memory does not grow with the number of images."""
    table = "mini_images" if variant == MINI_VARIANT else "tiles"
    scales = {scale for scale in SCALES if SCALE_FOLDER_OF[scale] in VARIANT_FOLDERS[variant]}
    selection = Selection(layout.shards_dir(variant).parent, batch_rows=batch_rows)
    missing: list[str] = []
    matched: set[ExclusionRule] = set()
    for entry in catalog.subdatasets:
        path = layout.manifest_file(entry.key, table)
        if not path.is_file():
            missing.append(entry.key)
            continue
        if exclusions:
            rules = layout.manifest_file(entry.key, "tiles")
            matched |= _matched_rules(entry.key, rules, exclusions, selection.batch_rows)
        holds = exclusions is not None and _may_hold(entry, exclusions)
        for batch in record_batches(path, _RECORD_COLUMNS, selection.batch_rows):
            rows = [row for row in batch if row["path"] is not None and row["scale"] in scales]
            reasons = held_out(entry, rows, exclusions) if holds else {}
            selection.hold(entry.key, reasons)
            selection.add(
                (sidecar(row, entry) for row in rows if identity(row) not in reasons),
                partition=entry.key,
            )
    images = VariantImages(selection, selection.held_out(), missing)
    if exclusions:
        built = [entry.key for entry in catalog.subdatasets if entry.key not in missing]
        images.unmatched_rules = unmatched_rules(exclusions, matched, built)
    return images


def _may_hold(entry: SubDataset, exclusions: Exclusions) -> bool:
    """Can `held_out` hold out any image of `entry`: an evaluated (labelled ROI) set, or one
    that a rule names? (Else its rows need not be matched, one by one, against no rule.)"""
    named = any(fnmatchcase(entry.key, rule.subdatasets) for rule in exclusions.rules)
    return named or (entry.kind == "roi" and entry.labelled)


def _matched_rules(
    key: str, tiles: Path, exclusions: Exclusions, batch_rows: int
) -> set[ExclusionRule]:
    """`matched_rules` over a partition's tiles, read in batches until every rule naming the
    partition has matched."""
    targeting = {rule for rule in exclusions.rules if fnmatchcase(key, rule.subdatasets)}
    matched: set[ExclusionRule] = set()
    if not targeting:
        return matched
    for rows in record_batches(tiles, _RULE_COLUMNS, batch_rows):
        matched |= matched_rules(key, rows, exclusions)
        if matched >= targeting:
            break
    return matched


LISTED_FAILURES = 100
"""Failure records an export (and each shard worker) keeps, in shard order; the rest counted."""


@dataclass
class ExportResult:
    index: dict[str, Any]
    written: bool  # False: the fingerprint matched, or an image failed, and nothing was written
    failures: list[dict[str, str]] = field(default_factory=list)  # the first LISTED_FAILURES
    failed: int = 0  # images that failed, all of them


def export_shards(
    sidecars: Iterable[Mapping[str, Any]] | Selection,
    *,
    variant: str,
    layout: DataLayout,
    settings: ShardSettings,
    held_out: Mapping[str, int] | None = None,
    executor: Executor | None = None,
    progress: Callable[[str], None] | None = None,
    batch_rows: int | None = None,
) -> ExportResult:
    """Write `sidecars`' images (paths relative to the data folder) as the variant's shards;
    `held_out` (images left out per reason) goes into the index.

    A `Selection` (from `variant_sidecars`) is read as it is; other sidecars are put into
    one first. Samples are streamed from it in key order (duplicate keys, the fingerprint,
    `samples.parquet`) and in shuffle order (the shards, `batch_rows` and at most
    `_SHARDS_IN_FLIGHT` shards at a time), so memory stays flat however many samples."""
    out_dir = layout.shards_dir(variant)
    if isinstance(sidecars, Selection):
        selection, own = sidecars, False
    else:
        selection, own = Selection(out_dir.parent, batch_rows=batch_rows), True
        selection.add(sidecars)
    try:
        return _export(selection, variant, layout, settings, held_out, executor, progress)
    finally:
        if own:
            selection.close()


def _export(
    selection: Selection,
    variant: str,
    layout: DataLayout,
    settings: ShardSettings,
    held_out: Mapping[str, int] | None,
    executor: Executor | None,
    progress: Callable[[str], None] | None,
) -> ExportResult:
    duplicates = [
        key
        for (key,) in selection.query(
            "SELECT key FROM samples GROUP BY key HAVING count(*) > 1 ORDER BY key LIMIT 3"
        )
    ]
    if duplicates:
        raise ValueError(f"{variant}: sample keys used twice, e.g. {duplicates}")
    out_dir = layout.shards_dir(variant)
    staging, aside = _staging(out_dir), _aside(out_dir)
    _recover(out_dir, staging, aside)
    held = _held_out(settings, held_out or {})
    fingerprint = _fingerprint(selection, layout, variant, settings, held)
    previous = out_dir / FINGERPRINT_FILE
    if previous.is_file() and previous.read_text() == fingerprint:
        if progress:
            progress(f"{variant}: inputs unchanged, nothing written")
        return ExportResult(json.loads((out_dir / INDEX_FILE).read_text()), written=False)
    with writing(out_dir):
        try:
            staging.mkdir(parents=True)
            written = _write_shards(selection, staging, layout.root, settings, executor)
            failed = sum(shard.failed for shard in written)
            failures = [f for shard in written for f in shard.failures]
            restricted = [
                key
                for (key,) in selection.query(
                    "SELECT DISTINCT subdataset FROM samples "
                    "WHERE redistributable IS NOT TRUE ORDER BY subdataset"
                )
            ]
            index = _index(variant, settings, written, restricted) | {
                "held_out": held,
                "fingerprint": fingerprint,
            }
            if not failed:  # an export missing images is never published
                (staging / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
                _write_samples(staging / SAMPLES_FILE, selection)
                (staging / FINGERPRINT_FILE).write_text(fingerprint)
                _swap_in(staging, out_dir, aside)
        finally:
            _recover(out_dir, staging, aside)
    if progress:
        done = "written" if not failed else f"not written: {failed} images failed"
        progress(f"{variant}: {index['images']} images in {len(written)} shards, {done}")
    return ExportResult(index, written=not failed, failures=failures, failed=failed)


_SHARDS_IN_FLIGHT = 8
"""Shards handed to the executor at a time (each holds its samples' paths and sidecars)."""


def shuffle_order(seed: int) -> str:
    """The shuffle: samples ordered by the MD5 of `<seed>:<key>` (ties, never expected, by
    key), a seeded permutation that any number of samples can be streamed in."""
    return f"md5('{int(seed)}:' || key), key"


def _write_shards(
    selection: Selection,
    staging: Path,
    root: Path,
    settings: ShardSettings,
    executor: Executor | None,
) -> list[_Shard]:
    """Every shard, `shard_size` samples each in shuffle order, written a few at a time; the
    shards come back in order, holding together at most LISTED_FAILURES failure records."""
    in_flight = _SHARDS_IN_FLIGHT if executor is not None else 1
    written: list[_Shard] = []
    jobs: list[_ShardJob] = []
    current: list[tuple[str, str, str, str]] = []
    listed = 0

    def flush() -> None:
        nonlocal listed
        for shard in sorted(map_unordered(_write_shard, jobs, executor), key=lambda s: s.file):
            kept = shard.failures[: LISTED_FAILURES - listed]
            listed += len(kept)
            written.append(replace(shard, failures=kept))
        jobs.clear()

    rows = selection.batches(shuffle_order(settings.seed), ("key", "path", "scale", "meta"))
    for batch in rows:
        for row in batch:
            current.append(row)
            if len(current) == settings.shard_size:
                jobs.append(_ShardJob(staging / _shard_name(len(written) + len(jobs)), root,
                                      current))  # fmt: skip
                current = []
                if len(jobs) == in_flight:
                    flush()
    if current:
        jobs.append(_ShardJob(staging / _shard_name(len(written) + len(jobs)), root, current))
    flush()
    return written


def _shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


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
    random-named staging folders of exports before `_swap_in`, and the selections of this
    host's exports whose process is gone)."""
    if aside.is_dir() and not out_dir.exists():
        aside.rename(out_dir)
    for stale in (staging, aside, *out_dir.parent.glob(f".{out_dir.name}.*.tmp")):
        shutil.rmtree(stale, ignore_errors=True)
    remove_dead_selections(out_dir.parent)


def _held_out(settings: ShardSettings, counts: Mapping[str, int]) -> dict[str, Any]:
    """The index's record of what the export held out for evaluation, and by which rules."""
    rules = Exclusions.load(settings.exclusions).texts if settings.apply_exclusions else []
    return {
        "applied": settings.apply_exclusions,
        "rules": rules,
        "images": dict(sorted(counts.items())),
    }


def _write_samples(path: Path, selection: Selection) -> None:
    """Every sample's key, sub-dataset, scale, path and perceptual hash (leak audit), in key
    order, streamed from the selection."""
    selection.copy_to_parquet(
        "SELECT key, subdataset, scale, path, phash FROM samples ORDER BY key", path
    )


@dataclass(frozen=True)
class _ShardJob:
    file: Path
    root: Path
    samples: Sequence[tuple[str, str, str, str]]  # key, path, scale, sidecar JSON


@dataclass(frozen=True)
class _Shard:
    file: str
    per_scale: dict[str, int]
    failures: list[dict[str, str]]  # the first LISTED_FAILURES
    failed: int


def _write_shard(job: _ShardJob) -> _Shard:
    """Worker: one tar; an image that cannot be read or is not a whole JPEG is left out with a
    failure naming it."""
    per_scale = dict.fromkeys(SCALES, 0)
    failures = []
    failed = 0
    with tarfile.open(job.file, "w") as tar:
        for key, path, scale, meta in job.samples:
            try:
                image = (job.root / path).read_bytes()
            except OSError as exc:
                problem: str | None = f"cannot read the image: {exc}"
            else:
                problem = jpeg_problem(image)
            if problem:
                failed += 1
                if failed <= LISTED_FAILURES:
                    failures.append(failure(path, STAGE, f"{path}: {problem}"))
                continue
            _add(tar, f"{key}.jpg", image)
            _add(tar, f"{key}.json", meta.encode())
            per_scale[scale] += 1
    return _Shard(job.file.name, per_scale, failures, failed)


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
    selection: Selection,
    layout: DataLayout,
    variant: str,
    settings: ShardSettings,
    held: Mapping[str, Any],
) -> str:
    """Hash of the settings and what was held out, then of each sample in key order: its key,
    sidecar and image file's size and mtime (streamed from the selection)."""
    header = [_EXPORT_VERSION, variant, asdict(settings), held]
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for batch in selection.batches("key", ("key", "path", "meta")):
        for key, path, meta in batch:
            try:
                stat = (layout.root / path).stat()
                identity = f"[{stat.st_size}, {stat.st_mtime_ns}]"
            except (OSError, TypeError):
                identity = "null"  # reported when the shard is written
            # = json.dumps([key, sidecar, identity], sort_keys=True)
            digest.update(f"[{json.dumps(key)}, {meta}, {identity}]".encode())
    return digest.hexdigest()
