"""cpia_mini: CPIA-Mini, the light, category-balanced subset of CPIA (spec "CPIA-Mini").

Balance. Every WSI sub-dataset gets an XL quota from the catalog alone (`xl_quota`): the
`organ_xl_budget` of its Table I organ row, shared evenly among that row's WSI sub-datasets
(those not wholly excluded), each capped at `subdataset_xl_cap` and at its published XL count;
what one cannot use passes to its peers (water-filling). Partitions stay independent, and
a changed budget changes (and rebuilds) only the partitions whose quota changed.

WSI sub-datasets. XL tiles are picked round-robin over the slides, each slide's tiles and the
slide order in a seeded random order (`spread_over_slides`), so no slide dominates and a larger
quota takes a superset. Each picked XL tile brings all its kept L tiles (at most 16), a seeded
choice of `m_per_xl` (32) of its kept M tiles (all when it has fewer), and from each chosen M
tile one 96 px cell, chosen (seeded) among the cells whose tissue fraction reaches
`s_min_tissue`, preferring cells that full CPIA keeps as S tiles (the most tissue-rich cell
when none reaches it). So per XL tile L <= 16, M = min(32, kept M), S = M: 1:16:32:32 on full
tissue. XL and L images are shrunk to 384 px with an area filter. S crops are cut from the
standardized slide's pixels, the source of the full-CPIA tiles (not from the decoded M JPEG,
which would add a JPEG generation), and enlarged with Lanczos-3. M tiles are 384 px already
and, like ROI images, are hard-linked (copied across file systems), never re-encoded.

ROI sub-datasets. Every image of an unlabelled set; of a labelled set the `train` split and
images without any split (`none`: no evaluation set is defined for them).

Evaluation hygiene. `exclusions.held_out` keeps evaluation data out of Mini (the same rule
every export applies): labelled sets' val/test images and everything the exclusion rules name.

Names. A Mini image keeps its source image's name. A Mini S crop is named after its 96 px cell
(`<slide>-96-<x>-<y>`): that is the full-CPIA S tile's name when full CPIA keeps the cell too
(its record's `source_tile`), and ends in `-mini` when only Mini has it (`source_tile` is then
the M tile). Every name leads back to its slide.

Per partition the build is all-or-nothing and resumable: images are written to hidden staging
folders (`cpia-mini/<L|M|S>/.<key>.mini.tmp/`) then moved into place, the records go to
`manifests/<key>/parts/mini/`, and a marker records the fingerprint (tile records, quota,
settings, exclusion rules). A rerun with the same fingerprint reuses everything while every
recorded image is on disk with its recorded size (else it rebuilds); JPEGs are encoded
deterministically, so a rebuild writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyvips

from cpia_assets.core import schema
from cpia_assets.core.catalog.model import SubDataset
from cpia_assets.core.fsutil import atomic_path, write_parquet_atomic
from cpia_assets.core.layout import SCALE_FOLDER_OF, SCALE_FOLDERS, DataLayout
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.perceptual import phash
from cpia_assets.core.schema import MiniReason
from cpia_assets.core.stage import StageResult, failure
from cpia_assets.core.training.exclusions import Exclusions, held_out, identity
from cpia_assets.core.training.mini_sampling import (
    MiniSettings,
    choose_s_cell,
    rng,
    spread_over_slides,
)
from cpia_assets.core.wsi.resample import shrink_by
from cpia_assets.core.wsi.tiling import tile_name
from cpia_assets.core.wsi.tissue import TissueThresholds, grid_metrics

STAGE = "cpia_mini"
MINI_SIZE = 384
S_CELLS_PER_M_EDGE = 4
"""An M tile (384 px) holds 4 x 4 S cells (96 px)."""

MINI_ONLY_SUFFIX = "-mini"
"""Ends the name of a Mini S crop whose 96 px cell is not a full-CPIA S tile."""

_RESUME_VERSION = 3  # 2: MINI_IMAGES `phash`; 3: S crops from the standardized slide
_STAGING_SUFFIX = ".mini.tmp"


@dataclass
class MiniResult(StageResult):
    """`records`: Mini images (schema.MINI_IMAGES); `selection`: every kept full-CPIA image
    of the partition with its `in_mini` flag and reason (schema.MINI_SELECTION)."""

    selection: list[dict[str, Any]] = field(default_factory=list)
    quota: int = 0


def build_mini_partition(
    entry: SubDataset,
    tiles: Sequence[Mapping[str, Any]],
    *,
    quota: int,
    exclusions: Exclusions,
    layout: DataLayout,
    settings: MiniSettings,
    executor: Executor | None = None,
    progress: Callable[[str], None] | None = None,
) -> MiniResult:
    """Build (or reuse) the Mini images of one partition from its kept TILES rows.

    `quota` comes from `xl_quota` and `exclusions` from `Exclusions.load(settings.exclusions)`.
    """
    key = entry.key
    parts = _Parts(layout, key)
    fingerprint = _fingerprint(entry, tiles, quota, settings, exclusions)
    if parts.matches(fingerprint):
        if progress:
            progress("Mini unchanged: reusing the earlier build")
        return parts.read(quota)
    parts.marker.unlink(missing_ok=True)
    staging = {folder: _staging(layout, folder, key) for folder in SCALE_FOLDERS}
    _remove(staging.values())
    excluded = held_out(entry, tiles, exclusions)
    result = MiniResult(quota=quota)
    if entry.kind == "wsi":
        wanted = [row for row in tiles if identity(row) not in excluded]
        jobs = _xl_jobs(key, wanted, quota, layout, staging, settings)
        for outcome in map_unordered(_run_xl_job, jobs, executor):
            result.records.extend(outcome.rows)
            if outcome.failure:
                result.failures.append(outcome.failure)
        if progress:
            progress(f"Mini: {len(jobs)} XL tiles picked (quota {quota})")
    else:
        result.records, result.failures = _link_rois(entry, tiles, excluded, layout, staging)
        if progress:
            progress(f"Mini: {len(result.records)} of {len(tiles)} ROI images")
    result.records.sort(key=lambda row: (row["scale"], row["image_name"]))
    result.selection = _selection(tiles, result.records, excluded)
    for folder, staged in staging.items():
        final = layout.mini_image_dir(folder, key)
        shutil.rmtree(final, ignore_errors=True)
        if staged.exists():
            staged.rename(final)
    parts.write(result, fingerprint)
    return result


def _staging(layout: DataLayout, folder: str, key: str) -> Path:
    return layout.mini_image_dir(folder, key).with_name(f".{key}{_STAGING_SUFFIX}")


def _remove(folders: Iterable[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _selection(
    tiles: Sequence[Mapping[str, Any]],
    images: Sequence[Mapping[str, Any]],
    excluded: Mapping[tuple[str, str], str],
) -> list[dict[str, Any]]:
    chosen = {identity(row) for row in images}
    rows = []
    for tile in tiles:
        name, scale = tile["image_name"], tile["scale"]
        if identity(tile) in excluded:
            reason = excluded[identity(tile)]
        elif identity(tile) in chosen:
            reason = MiniReason.SELECTED
        else:
            reason = MiniReason.NOT_SELECTED
        rows.append(
            {"image_name": name, "scale": scale, "in_mini": reason == MiniReason.SELECTED,
             "mini_reason": reason}
        )  # fmt: skip
    return rows


def _mini_row(
    key: str, tile: Mapping[str, Any], path: Path, layout: DataLayout, **values: Any
) -> dict[str, Any]:
    """A MINI_IMAGES row for `tile`'s pixels staged at `path`; `values` override defaults."""
    final = layout.mini_image_dir(path.parent.parent.name, key) / path.name  # once moved in
    return {
        "image_name": tile["image_name"],
        "subdataset": key,
        "kind": tile["kind"],
        "scale": tile["scale"],
        "size_px": MINI_SIZE,
        "source_size_px": tile["size_px"],
        "x": tile["x"],
        "y": tile["y"],
        "source_tile": tile["image_name"],
        "source_path": tile["path"],
        "source_file": tile["source_file"],
        "parent_image": None,
        "path": layout.relative(final),
        "label": tile["label"],
        "split": tile["split"],
        "bytes": path.stat().st_size,
        "phash": tile.get("phash"),  # the source tile's: right for linked images
        "resample": "none",
    } | values


def _link(source: Path, destination: Path) -> None:
    """Hard-link (copy across file systems): the image is already 384 px."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def _link_rois(
    entry: SubDataset,
    tiles: Sequence[Mapping[str, Any]],
    excluded: Mapping[tuple[str, str], str],
    layout: DataLayout,
    staging: Mapping[str, Path],
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Mini rows of the ROI images that enter Mini, linked; failures name unreadable ones."""
    rows, failures = [], []
    for tile in tiles:
        if identity(tile) in excluded:
            continue
        source = layout.root / tile["path"]
        destination = staging[SCALE_FOLDER_OF[tile["scale"]]] / source.name
        try:
            _link(source, destination)
        except OSError as exc:
            reason = f"{tile['path']}: cannot link the image into Mini: {exc}"
            failures.append(failure(tile["path"], STAGE, reason))
            continue
        rows.append(_mini_row(entry.key, tile, destination, layout))
    return rows, failures


@dataclass(frozen=True)
class _XlJob:
    """One picked XL tile and the children it brings (TILES rows); picklable."""

    key: str
    layout: DataLayout
    staging: Mapping[str, Path]
    xl: Mapping[str, Any]
    l_tiles: tuple[Mapping[str, Any], ...]
    m_tiles: tuple[Mapping[str, Any], ...]
    s_tiles: tuple[Mapping[str, Any], ...]
    """The kept full-CPIA S tiles under `m_tiles`: preferred as their S crops."""
    settings: MiniSettings


@dataclass(frozen=True)
class _XlOutcome:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failure: dict[str, str] | None = None


def _xl_jobs(
    key: str,
    tiles: Sequence[Mapping[str, Any]],
    quota: int,
    layout: DataLayout,
    staging: Mapping[str, Path],
    settings: MiniSettings,
) -> list[_XlJob]:
    by_name = {row["image_name"]: row for row in tiles}
    xl_by_slide: dict[str, list[str]] = defaultdict(list)
    children: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in tiles:
        if row["scale"] == "XL":
            xl_by_slide[row["source_file"]].append(row["image_name"])
        else:
            children[row["parent_image"], row["scale"]].append(row)
    jobs = []
    for xl in spread_over_slides(xl_by_slide, quota, settings.seed):
        kept_m = sorted(children[xl, "M"], key=lambda row: (row["y"], row["x"]))
        picked = rng(settings.seed, xl).choice(
            len(kept_m), size=min(settings.m_per_xl, len(kept_m)), replace=False
        )
        l_tiles = sorted(children[xl, "L"], key=lambda row: (row["y"], row["x"]))
        m_tiles = tuple(kept_m[i] for i in sorted(picked))
        s_tiles = tuple(s for m in m_tiles for s in children[m["image_name"], "S"] if s["path"])
        jobs.append(
            _XlJob(key, layout, staging, by_name[xl], tuple(l_tiles), m_tiles, s_tiles, settings)
        )
    return jobs


def _run_xl_job(job: _XlJob) -> _XlOutcome:
    """Worker: the Mini images of one XL tile; any error fails this XL tile only (its files
    removed) and names the file and the reason."""
    written: list[Path] = []
    current = job.xl
    try:
        rows = [_resized(job, job.xl, written)]
        for current in job.l_tiles:
            rows.append(_resized(job, current, written, parent=job.xl["image_name"]))
        if job.m_tiles:
            current = {"path": job.xl["standardized_file"]}
            slide = pyvips.Image.new_from_file(str(job.layout.root / current["path"]))
            full_cpia_s = {(row["x"], row["y"]): row for row in job.s_tiles}
        for current in job.m_tiles:
            rows.extend(_m_and_s(job, current, slide, full_cpia_s, written))
        return _XlOutcome(rows)
    except (pyvips.Error, OSError, ValueError) as exc:
        for path in written:
            path.unlink(missing_ok=True)
        reason = f"{current['path']}: cannot make the Mini image: {exc}"
        return _XlOutcome(failure=failure(current["path"], STAGE, reason))


def _save(image: pyvips.Image, job: _XlJob, scale: str, name: str, written: list[Path]) -> Path:
    path = job.staging[SCALE_FOLDER_OF[scale]] / f"{name}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    written.append(path)
    image.jpegsave(str(path), Q=job.settings.jpeg_quality, keep="none")
    return path


def _resized(
    job: _XlJob, tile: Mapping[str, Any], written: list[Path], parent: str | None = None
) -> dict[str, Any]:
    """An XL or L tile shrunk to 384 px with the area filter."""
    image = pyvips.Image.new_from_file(str(job.layout.root / tile["path"]), access="sequential")
    factors = (image.width / MINI_SIZE, image.height / MINI_SIZE)
    small = shrink_by(image, factors).crop(0, 0, MINI_SIZE, MINI_SIZE).copy_memory()
    path = _save(small, job, tile["scale"], tile["image_name"], written)
    values = {"parent_image": parent, "resample": "area", "phash": phash(small.numpy())}
    return _mini_row(job.key, tile, path, job.layout, **values)


def _m_and_s(
    job: _XlJob,
    m_tile: Mapping[str, Any],
    slide: pyvips.Image,
    full_cpia_s: Mapping[tuple[int, int], Mapping[str, Any]],
    written: list[Path],
) -> list[dict[str, Any]]:
    """The M tile linked unchanged, and its S crop: a 96 px cell of the standardized slide's
    pixels under the M tile (one JPEG generation, as the full-CPIA tiles), enlarged to 384 px
    with Lanczos-3."""
    layout = job.layout
    source = layout.root / m_tile["path"]
    destination = job.staging["M"] / source.name
    written.append(destination)
    _link(source, destination)
    m_row = _mini_row(job.key, m_tile, destination, layout, parent_image=job.xl["image_name"])
    cells, edge = S_CELLS_PER_M_EDGE, m_tile["size_px"] // S_CELLS_PER_M_EDGE
    left, top = m_tile["x"] * m_tile["size_px"], m_tile["y"] * m_tile["size_px"]
    region = slide.crop(left, top, m_tile["size_px"], m_tile["size_px"]).copy_memory()
    tissue = grid_metrics(region.numpy()[..., :3], cells, cells, TissueThresholds())
    origin = (m_tile["x"] * cells, m_tile["y"] * cells)
    preferred = np.array(
        [[(origin[0] + c, origin[1] + r) in full_cpia_s for c in range(cells)]
         for r in range(cells)]
    )  # fmt: skip
    settings = job.settings
    column, row = choose_s_cell(
        tissue["tissue_fraction"], settings.s_min_tissue, settings.seed, m_tile["image_name"],
        preferred=preferred,
    )  # fmt: skip
    crop = region.crop(column * edge, row * edge, edge, edge)
    enlarged = crop.resize(MINI_SIZE / edge, kernel="lanczos3").copy_memory()
    x, y = origin[0] + column, origin[1] + row
    source_tile = full_cpia_s.get((x, y), m_tile)
    name = s_crop_name(m_tile["image_name"], edge, x, y, in_full_cpia=(x, y) in full_cpia_s)
    path = _save(enlarged, job, "S", name, written)
    s_row = _mini_row(
        job.key, m_tile, path, layout, image_name=name, scale="S", source_size_px=edge, x=x, y=y,
        source_tile=source_tile["image_name"], source_path=source_tile["path"],
        parent_image=m_tile["image_name"], resample="lanczos", phash=phash(enlarged.numpy()),
    )  # fmt: skip
    return [m_row, s_row]


def s_crop_name(m_name: str, edge: int, x: int, y: int, *, in_full_cpia: bool) -> str:
    """A Mini S crop's name: the full-CPIA S tile's name `<stem>-96-<x>-<y>` when full CPIA
    keeps that cell too, else that name with `MINI_ONLY_SUFFIX` (a cell only Mini has)."""
    slide_stem = m_name.rsplit("-", 3)[0]  # `<stem>-<size>-<x>-<y>`
    name = tile_name(slide_stem, edge, x, y)
    return name if in_full_cpia else name + MINI_ONLY_SUFFIX


class _Parts:
    """The core's own copy of a partition's Mini records, and the fingerprint marker."""

    def __init__(self, layout: DataLayout, key: str) -> None:
        self.root = layout.root
        folder = layout.manifest_dir(key) / "parts" / "mini"
        self.images, self.selection = folder / "images.parquet", folder / "selection.parquet"
        self.marker = folder / "mini.json"

    def matches(self, fingerprint: str) -> bool:
        """The marker holds `fingerprint` and every recorded image is on disk with its size."""
        try:
            found = json.loads(self.marker.read_text()).get("fingerprint")
        except (OSError, ValueError):
            return False
        if found != fingerprint or not self.selection.is_file():
            return False
        try:
            recorded = pl.read_parquet(self.images, columns=["path", "bytes"])
        except (OSError, pl.exceptions.PolarsError):
            return False
        return all(_size(self.root / path) == size for path, size in recorded.iter_rows())

    def read(self, quota: int) -> MiniResult:
        return MiniResult(
            records=pl.read_parquet(self.images).to_dicts(),
            selection=pl.read_parquet(self.selection).to_dicts(),
            quota=quota,
            reused=1,
        )

    def write(self, result: MiniResult, fingerprint: str) -> None:
        """Records always; the marker only when nothing failed, so failures are retried."""
        write_parquet_atomic(schema.frame(result.records, schema.MINI_IMAGES), self.images)
        write_parquet_atomic(schema.frame(result.selection, schema.MINI_SELECTION), self.selection)
        if not result.failures:
            with atomic_path(self.marker) as tmp:
                tmp.write_text(json.dumps({"fingerprint": fingerprint}))


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


_FINGERPRINT_COLUMNS = (
    "image_name", "scale", "size_px", "x", "y", "path", "bytes", "parent_image", "source_file",
    "label", "split",
)  # fmt: skip


def _fingerprint(
    entry: SubDataset,
    tiles: Sequence[Mapping[str, Any]],
    quota: int,
    settings: MiniSettings,
    exclusions: Exclusions,
) -> str:
    """What a partition's Mini depends on: its tiles, quota, the per-image settings and the
    exclusion rules (not the budget or cap themselves: only the quota they give)."""
    per_image = asdict(settings) | {"organ_xl_budget": None, "subdataset_xl_cap": None}
    per_image["exclusions"] = [
        {"subdatasets": rule.subdatasets, "names": rule.names} for rule in exclusions.rules
    ]
    digest = hashlib.sha256()
    header = [_RESUME_VERSION, entry.key, entry.kind, entry.labelled, quota, per_image]
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for tile in sorted(tiles, key=lambda row: (row["scale"], row["image_name"])):
        digest.update(json.dumps([tile.get(c) for c in _FINGERPRINT_COLUMNS]).encode())
    return digest.hexdigest()
