"""`cpia plan`: what building a catalog will take, before anything is downloaded.

Per sub-dataset and in total: the images expected per scale (the catalog's `published_counts`,
for cpia.yaml the authors' per-set counts), the disk of each output and the hours of WSI tiling
at a throughput the caller gives (`cpia plan --throughput`, or `--measure`:
`core/wsi/measure.py`). Every byte figure is a count times a per-image size in `SIZES`, each
measured and stated where it came from; nothing is invented: raw sizes come from the catalog
(an `http` source's `size:` per file) or are None (unknown).

- **TIFF**: kept XL tiles x the standardized TIFF's bytes per XL tile of tissue. Glass around the
  tissue is not counted, so for real slides this is a lower bound.
- **tiles** (`cpia/`): images per scale x mean JPEG bytes per scale (WSI q75; ROI 384 px q90).
- **Mini** (`cpia-mini/`): the images `cpia_mini` would take with its default settings (the
  XL quota `mini_sampling.xl_quota` computes from the catalog, the published per-XL ratios of
  the set, the default exclusions), of which only XL, L and S are new files (q90); M tiles and
  ROI images are hard links. A labelled ROI set keeps its train split: its share for a declared
  stratified split, else unknown, so all its images are counted (an upper bound;
  `Plan.upper_bound`).
- **shards**: the `cpia-mini` and `cpia` exports (the cpia-l/m/s exports split `cpia` between
  them): each sample's JPEG bytes plus `SHARD_SAMPLE_OVERHEAD`. Sets the default exclusions
  hold out whole are left out; labelled sets' val/test images are counted as for Mini.
- **hours**: kept XL tiles / (XL tiles per second) / 3600, for WSI sets; ROI sets are not timed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cpia_assets.core.catalog.fields import ALL_SCALES
from cpia_assets.core.catalog.model import Catalog, SubDataset
from cpia_assets.core.training.exclusions import Exclusions, ExclusionSettings
from cpia_assets.core.training.mini_sampling import MiniSettings, xl_quota

TILE_BYTES = {"XL": 2_079_403, "L": 133_731, "M": 26_540, "S": 2_871}
"""Mean bytes of a kept WSI tile per scale at the platform's tile quality (JPEG q75): the tiles
`make demo` writes (real H&E pixels of the shipped CC0 CMU-1 crop on glass; 5 XL, 77 L, 373 M,
416 S tiles, `cpia count` / the manifest's `bytes`). Cross-check on the real
CMU-1-Small-Region.svs at 0.491 um/px, tiles with >= 10% tissue: L 146,655, M 29,778, S 2,925."""
ROI_BYTES = 65_059
"""Mean bytes of a standardized ROI image (384 px, JPEG q90): the 44 ROI images of `make demo`
(real H&E crops); the same pixels as a 384 px tile of the real crop re-encoded at q90: 64,306."""
MINI_BYTES = {"XL": 67_550, "L": 51_042, "M": 0, "S": 28_813}
"""New bytes per CPIA-Mini image (384 px, JPEG q90): XL and L shrunk, S enlarged (`make demo`'s
5 XL, 77 L, 160 S Mini images); M tiles and ROI images are hard links (0 new bytes)."""
TIFF_BYTES_PER_XL = 11_335_950
"""Standardized TIFF bytes per XL tile of tissue (3840^2 px): the real CMU-1-Small-Region.svs
standardized at q90 with its pyramid (`pyramid.save_pyramid`) took 6.15 bits per pixel."""
SHARD_SAMPLE_OVERHEAD = 1_792
"""Tar bytes per shard sample besides its JPEG: two 512-byte member headers, the JSON sidecar
in one 512-byte block (demo sidecars: at most 339 bytes) and on average 256 bytes padding the
JPEG to a block. Measured on `make demo`'s cpia-mini shard: 1,804 (end-of-archive blocks
included)."""
SIZES = {
    "tile_bytes": TILE_BYTES,
    "roi_bytes": ROI_BYTES,
    "mini_bytes": MINI_BYTES,
    "tiff_bytes_per_xl": TIFF_BYTES_PER_XL,
    "shard_sample_overhead": SHARD_SAMPLE_OVERHEAD,
}
L_PER_XL = 16
"""An XL tile holds 4 x 4 L tiles; Mini takes all kept ones."""


@dataclass
class PlanRow:
    """One sub-dataset (or the total): expected images, bytes per output, tiling hours."""

    subdataset: str
    kind: str
    images: dict[str, int]
    raw_bytes: int | None
    tiff_bytes: int
    tile_bytes: int
    mini_images: dict[str, int]
    mini_bytes: int
    shard_bytes: dict[str, int]
    hours: float | None

    @property
    def total_images(self) -> int:
        return sum(self.images.values())

    @property
    def disk_bytes(self) -> int:
        """Every output's bytes; raw files only where known (`raw_bytes`)."""
        return (
            (self.raw_bytes or 0)
            + self.tiff_bytes
            + self.tile_bytes
            + self.mini_bytes
            + sum(self.shard_bytes.values())
        )


@dataclass
class Plan:
    rows: list[PlanRow]
    total: PlanRow
    xl_per_second: float | None
    throughput_source: str
    upper_bound: list[str] = field(default_factory=list)
    """Labelled ROI sets without a declared split ratio: all their images counted in Mini and
    the exports (their val/test part is held out in a real build)."""
    raw_unknown: list[str] = field(default_factory=list)
    no_counts: list[str] = field(default_factory=list)
    """Sub-datasets whose catalog entry has no `published_counts`: nothing is planned for them."""

    def to_json(self) -> dict[str, Any]:
        rows = [self._row_json(row) for row in self.rows]
        return {
            "throughput": {"xl_tiles_per_second": self.xl_per_second,
                           "source": self.throughput_source},
            "sizes": SIZES,
            "subdatasets": rows,
            "total": self._row_json(self.total),
            "raw_unknown": self.raw_unknown,
            "no_published_counts": self.no_counts,
            "mini_upper_bound": self.upper_bound,
        }  # fmt: skip

    @staticmethod
    def _row_json(row: PlanRow) -> dict[str, Any]:
        return asdict(row) | {"total_images": row.total_images, "disk_bytes": row.disk_bytes}


def plan_catalog(
    catalog: Catalog,
    *,
    xl_per_second: float | None = None,
    throughput_source: str = "none given",
    mini: MiniSettings | None = None,
    exclusions: ExclusionSettings | None = None,
) -> Plan:
    """The plan of every sub-dataset of `catalog` and the total (see the module docstring)."""
    if xl_per_second is not None and not xl_per_second > 0:
        raise ValueError(f"the throughput must be a positive number, got {xl_per_second}")
    mini = mini or MiniSettings()
    rules = Exclusions.load(exclusions or mini.exclusions)
    rows, upper, unknown = [], [], []
    for entry in catalog.subdatasets:
        train_share = _train_share(entry)
        if train_share is None:
            if not rules.whole(entry.key):  # held out whole: nothing counted anyway
                upper.append(entry.key)
            train_share = 1.0
        row = _plan_row(catalog, entry, mini, rules, train_share, xl_per_second)
        if row.raw_bytes is None:
            unknown.append(entry.key)
        rows.append(row)
    total = PlanRow(
        subdataset="total",
        kind="",
        images=_sum_scales(row.images for row in rows),
        raw_bytes=None if unknown else sum(row.raw_bytes or 0 for row in rows),
        tiff_bytes=sum(row.tiff_bytes for row in rows),
        tile_bytes=sum(row.tile_bytes for row in rows),
        mini_images=_sum_scales(row.mini_images for row in rows),
        mini_bytes=sum(row.mini_bytes for row in rows),
        shard_bytes={name: sum(row.shard_bytes[name] for row in rows) for name in _EXPORTS},
        hours=None if xl_per_second is None else sum(row.hours or 0.0 for row in rows),
    )
    no_counts = [entry.key for entry in catalog.subdatasets if not entry.published_counts]
    return Plan(rows, total, xl_per_second, throughput_source, upper, unknown, no_counts)


_EXPORTS = ("cpia-mini", "cpia")


def _plan_row(
    catalog: Catalog,
    entry: SubDataset,
    mini: MiniSettings,
    rules: Exclusions,
    train_share: float,
    xl_per_second: float | None,
) -> PlanRow:
    images = {scale: int(entry.published_counts.get(scale, 0)) for scale in ALL_SCALES}
    excluded = rules.whole(entry.key)
    if entry.kind == "wsi":
        xl = images["XL"]
        quota = min(xl_quota(catalog, entry.key, mini, rules), xl)  # none published: none
        l_per_xl = min(L_PER_XL, images["L"] / xl) if xl else 0.0
        m_per_xl = min(mini.m_per_xl, images["M"] / xl) if xl else 0.0
        m = round(quota * m_per_xl)
        mini_images = {"XL": quota, "L": round(quota * l_per_xl), "M": m, "S": m}
        tile_bytes = sum(images[scale] * TILE_BYTES[scale] for scale in ALL_SCALES)
        mini_bytes = sum(mini_images[scale] * MINI_BYTES[scale] for scale in ALL_SCALES)
        mini_shard = sum(
            mini_images[scale] * (MINI_BYTES[scale] or TILE_BYTES[scale]) for scale in ALL_SCALES
        )
        tiff = xl * TIFF_BYTES_PER_XL
        hours = None if xl_per_second is None else xl / xl_per_second / 3600
        exported = 0 if excluded else tile_bytes + _overhead(images)
    else:
        kept = 0 if excluded else round(sum(images.values()) * train_share)
        shares = _split_by(images, kept)
        mini_images = shares
        tile_bytes = sum(images.values()) * ROI_BYTES
        mini_bytes = 0  # hard links
        mini_shard = kept * ROI_BYTES
        tiff, hours = 0, None
        exported = kept * (ROI_BYTES + SHARD_SAMPLE_OVERHEAD)
    mini_shard += sum(mini_images.values()) * SHARD_SAMPLE_OVERHEAD
    return PlanRow(
        subdataset=entry.key,
        kind=entry.kind,
        images=images,
        raw_bytes=raw_bytes(entry),
        tiff_bytes=tiff,
        tile_bytes=tile_bytes,
        mini_images=mini_images,
        mini_bytes=mini_bytes,
        shard_bytes={"cpia-mini": mini_shard, "cpia": exported},
        hours=hours,
    )


def _overhead(images: Mapping[str, int]) -> int:
    """The tar bytes of a set's samples besides their JPEGs."""
    return sum(images.values()) * SHARD_SAMPLE_OVERHEAD


def raw_bytes(entry: SubDataset) -> int | None:
    """The source's size when the catalog records it (every file of an `http` source has a
    `size:`), else None: gdc, idc, zenodo, figshare and manual sources list no sizes."""
    files = entry.source.get("files") if entry.source.get("type") == "http" else None
    if not files or any(not isinstance(f, Mapping) or f.get("size") is None for f in files):
        return None
    return sum(int(f["size"]) for f in files)


def _train_share(entry: SubDataset) -> float | None:
    """The share of a set that enters pre-training: 1 unless it is a labelled ROI set, then its
    stratified split's train ratio, or None (unknown: an official split of unknown size)."""
    if entry.kind != "roi" or not entry.labelled:
        return 1.0
    ratios = getattr(entry.splits, "ratios", None)
    if not ratios:
        return None
    return ratios.get("train", 0) / sum(ratios.values())


def _split_by(images: Mapping[str, int], kept: int) -> dict[str, int]:
    """`kept` images shared over the scales in proportion to `images`."""
    total = sum(images.values())
    if not total:
        return dict.fromkeys(ALL_SCALES, 0)
    return {scale: round(kept * images[scale] / total) for scale in ALL_SCALES}


def _sum_scales(rows) -> dict[str, int]:
    rows = list(rows)
    return {scale: sum(row[scale] for row in rows) for scale in ALL_SCALES}


def human_bytes(value: int | None) -> str:
    """1,536 -> '1.5 KB' (powers of 1000); None -> 'unknown'."""
    if value is None:
        return "unknown"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "PB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} PB"


PLAN_COLUMNS = ("subdataset", "kind", "XL", "L", "M", "S", "images", "raw", "TIFF", "tiles",
                "Mini", "Mini images", "shards", "disk", "hours")  # fmt: skip


def plan_table(plan: Plan) -> list[list[str]]:
    """The plan as text cells, a header row first and the total row last."""
    lines = [list(PLAN_COLUMNS)]
    for row in [*plan.rows, plan.total]:
        disk = human_bytes(row.disk_bytes)
        lines.append([
            row.subdataset, row.kind, *(f"{row.images[s]:,}" for s in ALL_SCALES),
            f"{row.total_images:,}", human_bytes(row.raw_bytes), human_bytes(row.tiff_bytes),
            human_bytes(row.tile_bytes), human_bytes(row.mini_bytes),
            f"{sum(row.mini_images.values()):,}", human_bytes(sum(row.shard_bytes.values())),
            disk if row.raw_bytes is not None else f">= {disk}",
            "" if row.hours is None else f"{row.hours:,.2f}",
        ])  # fmt: skip
    return lines


def plan_text(plan: Plan, catalog: Catalog, *, markdown: bool = False) -> str:
    """The plan as an aligned table (or markdown), then notes on what its figures rest on."""
    cells = plan_table(plan)
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        rule = ["---" if i < 2 else "---:" for i in range(len(cells[0]))]
        lines.insert(1, "|" + "|".join(rule) + "|")
    else:
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
                 for row in cells]  # fmt: skip
    rate = plan.xl_per_second
    notes = [
        f"catalog: {catalog.path} ({len(catalog.subdatasets)} sub-datasets); images: its "
        "published counts",
        f"hours: WSI tiling at {rate:.3g} XL tiles/s, {plan.throughput_source}"
        if rate is not None else "hours: pass --throughput XL_TILES_PER_S or --measure",
        f"raw: unknown for {len(plan.raw_unknown)} sub-datasets (the catalog records no size); "
        "disk is then a lower bound (>=)",
    ]  # fmt: skip
    if plan.no_counts:
        named = ", ".join(plan.no_counts[:5]) + (", ..." if len(plan.no_counts) > 5 else "")
        notes.append(
            f"no published counts in the catalog for {len(plan.no_counts)} sub-datasets "
            f"({named}): their images, disk and hours are not planned (0)"
        )
    if plan.upper_bound:
        notes.append(f"Mini and shards count every image of {len(plan.upper_bound)} labelled "
                     "ROI sets whose train share is unknown (upper bound)")  # fmt: skip
    return "\n".join([*lines, "", *notes])
