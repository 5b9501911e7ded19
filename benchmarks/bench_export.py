"""Benchmark `training_shards` (the full `cpia` variant) at growing sample counts: time and peak
memory side by side, to show memory flat and time linear in the number of samples.

For each size, the manifest benchmark's generator (`bench_manifest.write_partition`) writes
the per-partition records of the full CPIA catalog scaled to that many images, with every
record's `path` pointing at one of a few hundred tiny real JPEG files (the export reads each
image's bytes, so a shared file costs the same as its own). The export then runs as the asset
runs it (`variant_sidecars` with the default exclusions, `export_shards` on a pool of
`--workers` processes) in a fresh process, whose peak RSS (and its workers') is reported.

`--no-tar N` measures sizes >= N without writing tar files (10 M samples of shards are ~30 GB):
the selection, the key-order pass (duplicates, fingerprint) and the shuffle-order stream run
in full, each shard's samples are handed to a worker that only counts them; the row says so.

    .venv/bin/python benchmarks/bench_export.py [--sizes 100000 1000000 10000000] [--no-tar N]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import polars as pl
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import bench_manifest  # the manifest benchmark's generator

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training import shards
from cpia_assets.core.training.exclusions import Exclusions

SHARED_FILES = 256
PAPER_IMAGES = sum(bench_manifest.PAPER_V1_COLUMNS.values())


def generate(root: Path, samples: int) -> int:
    """Records of the full catalog scaled to about `samples` images; paths to shared JPEGs."""
    layout = DataLayout(root)
    for index in range(SHARED_FILES):
        path = layout.cpia_dir / "S" / "shared" / f"img-{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (index, 255 - index, 90)).save(path, quality=90)
    catalog = load_catalog("cpia")
    counts = bench_manifest.scaled_counts(catalog, samples / PAPER_IMAGES)
    written = 0
    for entry in catalog.subdatasets:
        written += bench_manifest.write_partition(layout, entry, counts[entry.key], "run-1")
        tiles = layout.manifest_file(entry.key, "tiles")
        frame = pl.read_parquet(tiles)
        number = (pl.int_range(pl.len()) % SHARED_FILES).cast(pl.String).str.zfill(3)
        shared_path = pl.format("cpia/S/shared/img-{}.jpg", number)
        frame = frame.with_columns(path=pl.when(pl.col("path").is_not_null()).then(shared_path))
        frame.write_parquet(tiles)
    return written


def _count_only(job: shards._ShardJob) -> shards._Shard:
    """A worker that counts a shard's samples per scale and writes nothing (--no-tar)."""
    per_scale = dict.fromkeys(shards.SCALES, 0)
    for _, _, scale, _ in job.samples:
        per_scale[scale] += 1
    return shards._Shard(job.file.name, per_scale, [], 0)


def export(root: Path, workers: int, write_tars: bool) -> dict[str, float | int]:
    """Run the export as the asset does; seconds per phase and peak RSS."""
    if not write_tars:
        shards._write_shard = _count_only
    layout = DataLayout(root)
    catalog = load_catalog("cpia")
    settings = shards.ShardSettings()
    started = time.perf_counter()
    images = shards.variant_sidecars(layout, catalog, "cpia", Exclusions.load(settings.exclusions))
    selected = time.perf_counter()
    # spawned workers: their RSS is their own, not pages shared with this process
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        result = shards.export_shards(images.sidecars, variant="cpia", layout=layout,
                                      settings=settings, held_out=images.held_out,
                                      executor=pool)  # fmt: skip
    done = time.perf_counter()
    assert result.written and not result.failures, result.failures[:3]
    own, workers_usage = (resource.getrusage(who) for who in
                          (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # fmt: skip
    return {
        "exported": result.index["images"],
        "held_out": sum(result.index["held_out"]["images"].values()),
        "select_s": selected - started,
        "export_s": done - selected,
        "total_s": done - started,
        "rss_gb": own.ru_maxrss / 1e6,
        "worker_rss_gb": workers_usage.ru_maxrss / 1e6,
        # CPU seconds: on a shared machine, a steadier measure than wall time
        "cpu_s": own.ru_utime + own.ru_stime,
        "worker_cpu_s": workers_usage.ru_utime + workers_usage.ru_stime,
        "shards_gb": sum(p.stat().st_size for p in layout.shards_dir("cpia").iterdir()) / 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--no-tar", type=int, default=None, help="sizes >= this write no tars")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="where the temporary folders go")
    parser.add_argument("--child", choices=["generate", "export"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tars", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "generate":
        print(json.dumps({"records": generate(args.root, args.sizes[0])}))
        return 0
    if args.child == "export":
        print(json.dumps(export(args.root, args.workers, bool(args.tars))))
        return 0
    rows = []
    for size in args.sizes:
        workdir = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.workdir))
        tars = args.no_tar is None or size < args.no_tar
        try:
            base = [sys.executable, __file__, "--root", str(workdir), "--workers",
                    str(args.workers), "--sizes", str(size)]  # fmt: skip
            started = time.perf_counter()
            made = _child([*base, "--child", "generate"])
            print(f"{size:,}: {made['records']:,} records written in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
            figures = _child([*base, "--child", "export", "--tars", str(int(tars))])
            rows.append((size, made["records"], tars, figures))
            print(f"{size:,}: {json.dumps(figures)}", flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n| samples (records) | exported | tar files | select s | export s | total s "
          "| us/sample | CPU s (main + workers) | peak RSS GB | worker peak RSS GB |\n"
          "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for _, records, tars, f in rows:
        print(f"| {records:,} | {f['exported']:,} | {'written' if tars else 'not written'} | "
              f"{f['select_s']:.0f} | {f['export_s']:.0f} | {f['total_s']:.0f} | "
              f"{f['total_s'] / f['exported'] * 1e6:.0f} | "
              f"{f['cpu_s']:.0f} + {f['worker_cpu_s']:.0f} | {f['rss_gb']:.2f} | "
              f"{f['worker_rss_gb']:.2f} |")  # fmt: skip
    return 0


def _child(command: list[str]) -> dict[str, int | float]:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    raise SystemExit(main())
