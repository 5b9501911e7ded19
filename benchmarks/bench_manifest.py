"""Benchmark the manifest at the paper's scale: 21,427,877 images in per-partition Parquet.

Builds a synthetic manifest for the full CPIA catalog (103 partitions; each sub-dataset's
published counts scaled so the columns match Table I of paper v1) in a temporary folder, then
times: the full load into DuckDB, a reload with nothing changed, the reload of one re-materialized
partition, the Table I query, a lineage lookup, filtered queries and the checks (each SQL check,
then all of them as the asset runs them; the file checks on empty files for 1% of the images).
Prints each figure beside its target and this process's peak RSS (the Parquet files are written
by child processes), and exits 1 if a target is missed. `--release` runs at the size of the
authors' later release (148,962,586 images) with its targets: the load within 4 minutes, the
SQL checks within 60 s, peak RSS under 8 GB. Everything is deleted at the end (peak disk use
about 2.5 GB at 21 M images, about 7 times that with --release).

    .venv/bin/python benchmarks/bench_manifest.py [--fraction 0.05 | --release] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from cpia_assets.core import schema
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.model import Catalog, SubDataset
from cpia_assets.core.fsutil import write_parquet_atomic
from cpia_assets.core.layout import SCALE_FOLDER_OF, DataLayout
from cpia_assets.core.manifest import integrity
from cpia_assets.core.manifest.database import memory_limit, open_manifest
from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets.core.manifest.mosaic import mosaic_samples
from cpia_assets.core.manifest.queries import (
    TileFilter,
    count_tiles,
    query_tiles,
    table_i,
    trace_image,
)

PAPER_V1_COLUMNS = {
    ("wsi", "XL"): 139_986,
    ("wsi", "L"): 1_789_066,
    ("roi", "L"): 287_541,
    ("wsi", "M"): 9_406_387,
    ("roi", "M"): 672_196,
    ("wsi", "S"): 8_933_442,
    ("roi", "S"): 199_259,
}
"""Table I totals of paper v1 (sum 21,427,877)."""

RELEASE_IMAGES = 148_962_586
"""Images of the authors' later release (the catalog's published counts)."""
TARGETS_S = {"full load": 60.0, "incremental reload": 5.0, "Table I query": 2.0,
             "asset checks (SQL)": 60.0}  # fmt: skip
RELEASE_TARGETS_S = {"full load": 240.0}
"""At the later release's size (--release): the load within 4 minutes, the checks 60 s."""
PEAK_RSS_TARGET_GB = 8.0
EDGE = integrity.TILE_EDGE_PX
XL_PER_SLIDE = 40
CELLS = {"L": 4, "M": 10, "S": 4}  # children per parent edge: 4x4 L and 10x10 M per XL, 4x4 S per M
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Synthetic partitions


def scaled_counts(catalog: Catalog, fraction: float) -> dict[str, dict[str, int]]:
    """Images per (sub-dataset, scale): published counts scaled to paper v1's column totals,
    with largest-remainder rounding so every column total is exact."""
    counts: dict[str, dict[str, int]] = {entry.key: {} for entry in catalog.subdatasets}
    for (kind, scale), total in PAPER_V1_COLUMNS.items():
        entries = [e for e in catalog.subdatasets if e.kind == kind and scale in e.published_counts]
        published = sum(e.published_counts[scale] for e in entries)
        target = round(total * fraction)
        shares = [(e.key, e.published_counts[scale] * target / published) for e in entries]
        floors = {key: int(share) for key, share in shares}
        left = target - sum(floors.values())
        for key, _ in sorted(shares, key=lambda item: item[1] - int(item[1]), reverse=True)[:left]:
            floors[key] += 1
        for key, n in floors.items():
            counts[key][scale] = n
    for entry in catalog.subdatasets:
        if entry.kind == "wsi":
            _fit_to_spec(counts[entry.key])
    return counts


def _fit_to_spec(counts: dict[str, int]) -> None:
    """At least one XL tile when there are children; children within the spec's grids."""
    if any(counts.get(s, 0) for s in ("L", "M", "S")):
        counts["XL"] = max(counts.get("XL", 0), 1)
    xl = counts.get("XL", 0)
    counts["L"] = min(counts.get("L", 0), 16 * xl)
    counts["M"] = max(min(counts.get("M", 0), 100 * xl), 1 if counts.get("S") else 0)
    counts["S"] = min(counts.get("S", 0), 16 * counts["M"], 160 * xl)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tile_frame(
    entry: SubDataset,
    scale: str,
    n: int,
    *,
    parents: pl.DataFrame | None,
    slides: pl.DataFrame,
) -> pl.DataFrame:
    """`n` WSI tiles of one scale; each child cell of a parent is used once (row-major)."""
    index = pl.int_range(n, dtype=pl.Int64)
    if parents is None:  # XL: 40 per slide on an 8x5 grid
        frame = pl.select(
            slide=index // XL_PER_SLIDE,
            x=(index % XL_PER_SLIDE % 8).cast(pl.Int32),
            y=(index % XL_PER_SLIDE // 8).cast(pl.Int32),
            parent_image=pl.lit(None, pl.String),
            in_mini=pl.lit(True),
        )
    else:
        cells = CELLS[scale]
        parent = index % parents.height
        cell = index // parents.height
        frame = pl.select(parent=parent, cell=cell).join(
            parents.with_row_index("parent").with_columns(pl.col("parent").cast(pl.Int64)),
            on="parent",
            how="left",
        )
        frame = frame.select(
            "slide",
            x=(pl.col("x") * cells + pl.col("cell") % cells).cast(pl.Int32),
            y=(pl.col("y") * cells + pl.col("cell") // cells).cast(pl.Int32),
            parent_image=pl.col("image_name"),
            in_mini=pl.col("in_mini") & (pl.col("cell") < (32 if scale == "M" else 16)),
        )
    frame = frame.join(slides.select("slide", "stem", "source_sha256"), on="slide", how="left")
    key, folder = entry.key, SCALE_FOLDER_OF[scale]
    name = pl.format("{}-{}-{}-{}", "stem", pl.lit(EDGE[scale]), "x", "y")
    noise = pl.int_range(n).hash(seed=7) % 1000
    return frame.with_columns(
        mini_reason=pl.lit(None, pl.String),
        image_name=name,
        subdataset=pl.lit(key),
        kind=pl.lit("wsi"),
        scale=pl.lit(scale),
        size_px=pl.lit(EDGE[scale], pl.Int32),
        source_file=pl.format("raw/{}/{}.svs", pl.lit(key), "stem"),
        standardized_file=pl.format("standardized/{}/{}.tiff", pl.lit(key), "stem"),
        path=pl.format("cpia/{}/{}/{}.jpg", pl.lit(folder), pl.lit(key), name),
        label=pl.lit(None, pl.String),
        split=pl.lit("none"),
        bytes=(noise * 97 + EDGE[scale] ** 2 // 12).cast(pl.Int64),
        phash=(pl.int_range(n).hash(seed=11) % (1 << 62)).cast(pl.Int64),
        cut_from=pl.lit("resampled"),
        upscaled=pl.lit(False),
        mean_r=(180 + noise / 50).cast(pl.Float32),
        mean_g=(120 + noise / 40).cast(pl.Float32),
        mean_b=(170 + noise / 60).cast(pl.Float32),
        tissue_fraction=(noise / 1000).cast(pl.Float32),
        saturation=(noise / 2000).cast(pl.Float32),
        blur=(noise / 10).cast(pl.Float32),
    )


def write_wsi_partition(
    layout: DataLayout, entry: SubDataset, counts: dict[str, int], run_id: str
) -> int:
    n_slides = max(1, -(-counts["XL"] // XL_PER_SLIDE))
    stems = [f"{entry.key.upper()}-{i:05d}" for i in range(n_slides)]
    slides = pl.DataFrame({
        "slide": range(n_slides),
        "stem": stems,
        "source_sha256": [_sha256(stem) for stem in stems],
    }, schema_overrides={"slide": pl.Int64})  # fmt: skip
    frames = {}
    frames["XL"] = _tile_frame(entry, "XL", counts["XL"], parents=None, slides=slides)
    for scale, parent in (("L", "XL"), ("M", "XL"), ("S", "M")):
        parents = frames[parent].select("slide", "x", "y", "image_name", "in_mini")
        frames[scale] = _tile_frame(entry, scale, counts[scale], parents=parents, slides=slides)
    tiles = pl.concat([frame.select(schema.TILES.keys()) for frame in frames.values()])
    rejected = (
        frames["XL"]
        .select(schema.TILES.keys())
        .with_columns(image_name=pl.col("image_name") + "-r", path=pl.lit(None, pl.String))
    )
    slide_rows = [
        {"source_file": f"raw/{entry.key}/{stem}.svs", "source_bytes": 1 << 30,
         "source_sha256": _sha256(stem), "vendor": "aperio", "width": 80_000, "height": 60_000,
         "mpp_x": 0.2527, "mpp_y": 0.2527, "mpp_origin": "openslide", "level": 0,
         "level_downsample": 1.0, "scale_factor": 0.2527 / 0.491, "resampled": True,
         "target_mpp": 0.491, "standardized_file": f"standardized/{entry.key}/{stem}.tiff",
         "std_width": 41_170, "std_height": 30_880}
        for stem in stems
    ]  # fmt: skip
    origin = f"https://example.org/{entry.key}"
    raw_rows = [{"rel_path": f"{stem}.svs", "bytes": 1 << 30, "sha256": _sha256(stem),
                 "source": f"{origin}/{stem}.svs"} for stem in stems]  # fmt: skip
    _write(layout, entry.key, "raw_files", schema.frame(raw_rows, schema.RAW_FILES), run_id)
    _write(layout, entry.key, "slides", schema.frame(slide_rows, schema.SLIDES), run_id)
    _write(layout, entry.key, "tiles", tiles, run_id)
    _write(layout, entry.key, "rejected_tiles", rejected, run_id)
    _write(layout, entry.key, "failures-scale_tiles", schema.frame([], schema.FAILURES), run_id)
    return tiles.height


def write_roi_partition(
    layout: DataLayout, entry: SubDataset, counts: dict[str, int], run_id: str
) -> int:
    frames = []
    for scale, n in counts.items():
        index = pl.int_range(n)
        name = pl.format("{}_{}", pl.lit(scale), index)
        label = pl.format("class_{}", index % 5)
        source = pl.format("raw/{}/{}/{}.png", pl.lit(entry.key), label, name)
        frames.append(
            pl.select(
                image_name=name,
                subdataset=pl.lit(entry.key),
                kind=pl.lit("roi"),
                scale=pl.lit(scale),
                size_px=pl.lit(384, pl.Int32),
                source_file=source,
                source_sha256=source,  # replaced below by a real digest
                path=pl.format("cpia/{}/{}/{}.jpg", pl.lit(scale), pl.lit(entry.key), name),
                label=label,
                split=pl.when(index % 10 < 7).then(pl.lit("train")).otherwise(pl.lit("test")),
                bytes=(index.hash(seed=3) % 20_000 + 20_000).cast(pl.Int64),
                upscaled=index % 3 == 0,
            )
        )
    images = pl.concat(frames).with_columns(
        source_sha256=pl.col("source_file").map_batches(
            lambda paths: pl.Series([_sha256(p) for p in paths]), return_dtype=pl.String
        ),
        in_mini=pl.col("split") == "train",
    )
    # every TILES column, those not set above (x, y, metrics, ...) as nulls
    images = pl.concat([schema.frame([], schema.TILES), images], how="diagonal_relaxed")
    raw = images.select(
        rel_path=pl.col("source_file").str.strip_prefix(f"raw/{entry.key}/"),
        bytes=pl.col("bytes") * 3,
        sha256="source_sha256",
        source=pl.lit("https://example.org/") + pl.col("source_file"),
        fetched_at=pl.lit(None, schema.RAW_FILES["fetched_at"]),
    )
    _write(layout, entry.key, "raw_files", raw, run_id)
    _write(layout, entry.key, "roi_images", images, run_id)
    _write(layout, entry.key, "tiles", images, run_id)
    return images.height


def _write(layout: DataLayout, key: str, table: str, frame: pl.DataFrame, run_id: str) -> None:
    stamped = frame.with_columns(run_id=pl.lit(run_id), code_version=pl.lit("1"))
    write_parquet_atomic(stamped, layout.manifest_file(key, table))


def write_partition(
    layout: DataLayout, entry: SubDataset, counts: dict[str, int], run_id: str
) -> int:
    writer = write_wsi_partition if entry.kind == "wsi" else write_roi_partition
    return writer(layout, entry, counts, run_id)


# ---------------------------------------------------------------------------------------------
# Timing


_CPU = {"last": 0.0}
"""CPU seconds of this process (DuckDB's threads included) in the last `timed` call."""


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(function: Callable[[], T]) -> tuple[T, float]:
    started, cpu = time.perf_counter(), _cpu_s()
    result = function()
    _CPU["last"] = _cpu_s() - cpu
    return result, time.perf_counter() - started


def median_time(function: Callable[[], Any], repeats: int = 5) -> float:
    return statistics.median(timed(function)[1] for _ in range(repeats))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@dataclass
class Figures:
    rows: list[tuple[str, float, float | None, str]] = field(default_factory=list)
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS_S))

    def note(self, name: str, seconds: float, detail: str = "") -> None:
        """A figure; `detail` gains the CPU seconds of its `timed` call (on a shared machine
        a steadier measure than wall time)."""
        detail = f"{detail}; {_CPU['last']:.1f} CPU s".lstrip("; ")
        self.rows.append((name, seconds, self.targets.get(name), detail))
        print(f"  {name}: {seconds:.2f} s {detail}", flush=True)


def in_child(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a fresh process: the Parquet writer's memory (Polars frames of a
    whole partition) stays out of this process's peak RSS, which measures the manifest."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _write_all(root: Path, fraction: float) -> dict[str, dict[str, int]]:
    return write_manifest(DataLayout(root), load_catalog("cpia"), fraction)


def _rewrite(root: Path, key: str, counts: dict[str, int], run_id: str) -> None:
    catalog = load_catalog("cpia")
    write_partition(DataLayout(root), catalog.get(key), counts, run_id)


def write_manifest(
    layout: DataLayout, catalog: Catalog, fraction: float
) -> dict[str, dict[str, int]]:
    counts = scaled_counts(catalog, fraction)
    for entry in catalog.subdatasets:
        write_partition(layout, entry, counts[entry.key], "run-1")
    return counts


def bench_database(workdir: Path, fraction: float, figures: Figures) -> None:
    catalog = load_catalog("cpia")
    layout = DataLayout(workdir / "data")
    print(f"Writing {round(sum(PAPER_V1_COLUMNS.values()) * fraction):,} synthetic images ...")
    counts, seconds = timed(lambda: in_child(_write_all, layout.root, fraction))
    size = folder_bytes(layout.manifests_dir) / 1e9
    figures.note("write Parquet (not a target)", seconds, f"{size:.2f} GB of Parquet")

    report, seconds = timed(lambda: load_manifest(layout, catalog))
    figures.note("full load", seconds, f"{report.rows['tiles']:,} tiles, {len(report.loaded)} "
                 f"files, {sum(report.rows.values()):,} rows in all")  # fmt: skip
    _, seconds = timed(lambda: load_manifest(layout, catalog))
    figures.note("reload, nothing changed", seconds)

    wsi = sorted((sum(counts[e.key].values()), e.key) for e in catalog.subdatasets
                 if e.kind == "wsi")  # fmt: skip
    for name, (images, key) in (
        ("incremental reload", wsi[len(wsi) // 2]),
        ("incremental reload, largest partition", wsi[-1]),
    ):
        in_child(_rewrite, layout.root, key, counts[key], "run-2")
        report, seconds = timed(lambda: load_manifest(layout, catalog))
        assert report.reloaded_partitions == [key], report.reloaded_partitions
        figures.note(name, seconds, f"{key}: {images:,} images, {len(report.loaded)} files")

    with open_manifest(layout) as con:
        frame, seconds = timed(lambda: table_i(con))
        total = frame.filter(pl.col("organ") == "Total")["total"].item()
        figures.note("Table I query", seconds, f"first on a new connection; total {total:,}")
        figures.note("Table I query, warm", median_time(lambda: table_i(con)), "median of 5")
        s_tile = con.execute(
            "SELECT image_name FROM tiles WHERE scale = 'S' AND kind = 'wsi' LIMIT 1"
        ).fetchall()[0][0]
        steps, seconds = timed(lambda: trace_image(con, s_tile))
        figures.note("lineage of one S tile", seconds, f"{steps.height} steps")
        mini_breast_m = TileFilter(organs=("breast",), scales=("M",), mini_only=True)
        _, seconds = timed(lambda: query_tiles(con, mini_breast_m, limit=1000))
        figures.note("filtered tile query, 1000 rows", seconds)
        _, seconds = timed(lambda: count_tiles(con, by=("organ", "scale", "split")))
        figures.note("count by organ, scale, split", seconds)
        picks, seconds = timed(lambda: mosaic_samples(con, samples=3))
        figures.note("mosaic sample query", seconds, f"{len(picks)} cells; drawing not timed")
        outcome, seconds = timed(lambda: integrity.ratios_within_spec(con))
        ratio = outcome.details["ratio_XL_L_M_S"]
        figures.note("ratio check", seconds, f"passed={outcome.passed}, XL:L:M:S {ratio}")
        outcome, seconds = timed(lambda: integrity.unique_names_per_folder(con))
        figures.note("unique-name check", seconds, f"passed={outcome.passed}")
        outcome, seconds = timed(lambda: integrity.raw_files_accounted(con))
        figures.note("raw-files check", seconds, f"passed={outcome.passed}")
        outcome, seconds = timed(lambda: integrity.mini_ratios(con))
        figures.note("Mini ratio check", seconds, f"passed={outcome.passed}")
        sql_checks = [name for name in integrity.CHECKS if name not in FILE_CHECKS]
        outcomes, seconds = timed(lambda: integrity.run_checks(con, layout, sql_checks))
        failed = [name for name, outcome in outcomes.items() if not outcome.passed]
        figures.note("asset checks (SQL)", seconds, f"{', '.join(sql_checks)}; failed: {failed}")
    print(f"  manifest.duckdb: {layout.duckdb_path.stat().st_size / 1e9:.2f} GB", flush=True)


FILE_CHECKS = ("rows_have_files", "no_orphan_files")
"""The checks that walk the image folders (timed by `bench_file_checks`, per file)."""


def bench_file_checks(workdir: Path, fraction: float, figures: Figures) -> None:
    """The two file checks walk every image: timed on empty (sparse) files of the right size."""
    catalog = load_catalog("cpia")
    layout = DataLayout(workdir / "files")
    in_child(_write_all, layout.root, fraction)
    load_manifest(layout, catalog)
    with open_manifest(layout) as con:
        rows = con.execute("SELECT path, bytes FROM tiles").fetchall()
    for path, size in rows:
        image = layout.root / path
        image.parent.mkdir(parents=True, exist_ok=True)
        with image.open("wb") as handle:
            handle.truncate(size)
    with open_manifest(layout) as con:
        comparison, seconds = timed(lambda: integrity.compare_files(con, layout))
    assert sum(comparison.problems.values()) == 0, comparison.problems
    figures.note("file checks", seconds, f"{comparison.files:,} image files, "
                 f"{seconds / comparison.files * 1e6:.1f} us per file")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=1.0, help="of the 21.4M images")
    parser.add_argument(
        "--release", action="store_true",
        help="the later release's size, 149.0M images (--fraction 6.95), with its targets",
    )  # fmt: skip
    parser.add_argument(
        "--files-fraction", type=float, default=0.01, help="of the images made files (0: skip)"
    )
    parser.add_argument("--workdir", type=Path, help="where the temporary folder goes")
    args = parser.parse_args()
    figures = Figures()
    if args.release:
        args.fraction = RELEASE_IMAGES / sum(PAPER_V1_COLUMNS.values())
        figures.targets |= RELEASE_TARGETS_S
    workdir = Path(tempfile.mkdtemp(prefix="bench-manifest-", dir=args.workdir))
    try:
        bench_database(workdir, args.fraction, figures)
        if args.files_fraction:
            bench_file_checks(workdir, args.files_fraction, figures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"Peak RSS {peak:.2f} GB (target {PEAK_RSS_TARGET_GB} GB; the Parquet writer runs in "
          f"child processes; DuckDB memory limit {memory_limit()})")  # fmt: skip
    print("\n| figure | seconds | target | ratio | detail |\n|---|---:|---:|---:|---|")
    for name, seconds, target, detail in figures.rows:
        ratio = f"{seconds / target:.2f}" if target else ""
        print(f"| {name} | {seconds:.2f} | {target or ''} | {ratio} | {detail} |")
    misses = [name for name, seconds, target, _ in figures.rows if target and seconds > target]
    return 1 if misses or peak > PEAK_RSS_TARGET_GB else 0


if __name__ == "__main__":
    raise SystemExit(main())
