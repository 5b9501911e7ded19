"""A data folder with real images cut from a real slide (CMU-1-Small-Region), and per-partition
Parquet records written the way the Dagster shell writes them (schema columns, run id, code
version): the manifest's, the integrity checks' and the CLI's tests build on it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import openslide
import polars as pl
from PIL import Image

from cpia_assets.core import schema
from cpia_assets.core.catalog.model import Catalog, SubDataset
from cpia_assets.core.fsutil import sha256_file, write_parquet_atomic
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.perceptual import phash
from cpia_assets_tests.support.paths import TESTDATA

SLIDE = TESTDATA / "CMU-1-Small-Region.svs"  # Aperio, 2220x2967, MPP 0.499

RUN_IDS = {
    "raw_download": "run-raw-1",
    "standardized_wsi": "run-std-1",
    "scale_tiles": "run-tiles-1",
    "cpia_mini": "run-mini-1",
}
CODE_VERSIONS = {"raw_download": "raw-v1", "standardized_wsi": "std-v2", "scale_tiles": "tiles-v3",
                 "cpia_mini": "mini-v1"}  # fmt: skip
EDGE = {"XL": 3840, "L": 960, "M": 384, "S": 96}
PIXELS_PER_SAVED_PX = 16  # saved images are the slide region shrunk to keep the tests small
TISSUE_ORIGIN = (700, 900)  # level-0 pixel of the slide where tile (0, 0) starts: tissue there


@dataclass(frozen=True)
class DataFolder:
    layout: DataLayout
    catalog: Catalog


def entry(key: str, kind: str, organ: str, **extra: Any) -> SubDataset:
    return SubDataset(key=key, name=key.upper(), kind=kind, organ=organ,
                      source={"type": "manual"}, **extra)  # fmt: skip


def write_records(
    layout: DataLayout,
    key: str,
    table: str,
    rows: Iterable[Mapping[str, Any]],
    columns: Mapping[str, pl.DataType],
    asset: str,
) -> Path:
    frame = schema.frame(rows, columns).with_columns(
        run_id=pl.lit(RUN_IDS[asset]), code_version=pl.lit(CODE_VERSIONS[asset])
    )
    return write_parquet_atomic(frame, layout.manifest_file(key, table))


def save_image(layout: DataLayout, key: str, scale: str, name: str, pixels: Image.Image) -> Path:
    path = layout.image_dir(scale, key) / f"{name}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels.convert("RGB").save(path, format="JPEG", quality=85)
    return path


def tile_row(
    layout: DataLayout, key: str, slide: openslide.OpenSlide, stem: str, scale: str, x: int, y: int,
    *, parent: str | None, in_mini: bool, sha256: str,
) -> dict[str, Any]:  # fmt: skip
    size = EDGE[scale] // PIXELS_PER_SAVED_PX
    origin = (TISSUE_ORIGIN[0] + x * size, TISSUE_ORIGIN[1] + y * size)
    region = slide.read_region(origin, 0, (size, size)).convert("RGB")
    name = f"{stem}-{EDGE[scale]}-{x}-{y}"
    path = save_image(layout, key, scale, name, region)
    means = np.asarray(region, dtype=np.float32).mean(axis=(0, 1))
    return {
        "image_name": name, "subdataset": key, "kind": "wsi", "scale": scale, "size_px": size,
        "x": x, "y": y, "source_file": f"raw/{key}/{stem}.svs", "source_sha256": sha256,
        "standardized_file": f"standardized/{key}/{stem}.tiff", "path": layout.relative(path),
        "parent_image": parent, "split": "none", "bytes": path.stat().st_size, "upscaled": False,
        "mean_r": means[0], "mean_g": means[1], "mean_b": means[2], "tissue_fraction": 0.8,
        "saturation": 0.3, "blur": 12.0, "in_mini": in_mini, "phash": phash(region),
    }  # fmt: skip


def write_wsi_partition(
    layout: DataLayout, key: str, stem: str, xl_cells: list[tuple[int, int]]
) -> None:
    """Per XL tile: 2 L and 2 M children, and one S child of the first M tile."""
    raw = layout.raw_dir(key) / f"{stem}.svs"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.symlink_to(SLIDE)
    sha256 = sha256_file(raw)
    tiles = []
    with openslide.OpenSlide(SLIDE) as slide:
        for x, y in xl_cells:
            common = {"in_mini": True, "sha256": sha256}
            xl = tile_row(layout, key, slide, stem, "XL", x, y, parent=None, **common)
            tiles.append(xl)
            for scale, ratio in (("L", 4), ("M", 10)):
                for dx in (0, 1):
                    child = (ratio * x + dx, ratio * y)
                    tiles.append(tile_row(layout, key, slide, stem, scale, *child,
                                          parent=xl["image_name"], **common))  # fmt: skip
            first_m = tiles[-2]
            cell = (4 * first_m["x"], 4 * first_m["y"])
            tiles.append(tile_row(layout, key, slide, stem, "S", *cell,
                                  parent=first_m["image_name"], **common))  # fmt: skip
        width, height = slide.dimensions
    rejected = {**tiles[0], "image_name": f"{stem}-3840-9-9", "x": 9, "y": 9, "path": None,
                "bytes": None, "tissue_fraction": 0.01, "in_mini": False}  # fmt: skip
    slide_row = {
        "source_file": f"raw/{key}/{stem}.svs", "source_bytes": SLIDE.stat().st_size,
        "source_sha256": sha256, "vendor": "aperio", "width": width, "height": height,
        "mpp_x": 0.499, "mpp_y": 0.499, "mpp_origin": "openslide", "level": 0,
        "level_downsample": 1.0, "scale_factor": 0.499 / 0.491, "resampled": True,
        "target_mpp": 0.491, "standardized_file": f"standardized/{key}/{stem}.tiff",
        "std_width": round(width * 0.499 / 0.491), "std_height": round(height * 0.499 / 0.491),
    }  # fmt: skip
    raw_row = {"rel_path": f"{stem}.svs", "bytes": SLIDE.stat().st_size, "sha256": sha256,
               "source": f"https://example.org/{stem}.svs"}  # fmt: skip
    write_records(layout, key, "raw_files", [raw_row], schema.RAW_FILES, "raw_download")
    write_records(layout, key, "slides", [slide_row], schema.SLIDES, "standardized_wsi")
    write_records(layout, key, "tiles", tiles, schema.TILES, "scale_tiles")
    write_records(layout, key, "rejected_tiles", [rejected], schema.TILES, "scale_tiles")


def write_roi_partition(layout: DataLayout, key: str, count: int) -> None:
    """`count` S-scale ROI images from PNG sources in <label>/ folders; train ones in Mini
    (flagged in the tiles, and as cpia_mini's records, with the Mini images linked)."""
    raw_rows, images = [], []
    with openslide.OpenSlide(SLIDE) as slide:
        for index in range(count):
            label = ("lymphocyte", "neutrophil")[index % 2]
            split = ("train", "train", "val", "test")[index % 4]
            crop = slide.read_region((500 + 40 * index, 700), 0, (40, 40)).convert("RGB")
            source = layout.raw_dir(key) / label / f"cell_{index}.png"
            source.parent.mkdir(parents=True, exist_ok=True)
            crop.save(source)
            sha256 = sha256_file(source)
            relative = f"{label}/cell_{index}.png"
            url = f"https://example.org/{relative}"
            raw_rows.append({"rel_path": relative, "bytes": source.stat().st_size,
                             "sha256": sha256, "source": url})  # fmt: skip
            small = crop.resize((32, 32))
            path = save_image(layout, key, "S", f"cell_{index}", small)
            images.append({
                "image_name": f"cell_{index}", "subdataset": key, "kind": "roi", "scale": "S",
                "size_px": 32, "source_file": layout.relative(source), "source_sha256": sha256,
                "path": layout.relative(path), "label": label, "split": split,
                "bytes": path.stat().st_size, "upscaled": True, "in_mini": split == "train",
                "phash": phash(small),
            })  # fmt: skip
    write_records(layout, key, "raw_files", raw_rows, schema.RAW_FILES, "raw_download")
    write_records(layout, key, "roi_images", images, schema.TILES, "standardized_wsi")
    write_records(layout, key, "tiles", images, schema.TILES, "scale_tiles")
    selection, mini = [], []
    for image in images:
        reason = "selected" if image["in_mini"] else "val/test split"
        selection.append({**image, "mini_reason": reason})
        if image["in_mini"]:
            linked = layout.mini_image_dir("S", key) / Path(image["path"]).name
            linked.parent.mkdir(parents=True, exist_ok=True)
            os.link(layout.root / image["path"], linked)
            mini.append(
                {**image, "source_tile": image["image_name"], "path": layout.relative(linked)}
            )
    write_records(layout, key, "mini_selection", selection, schema.MINI_SELECTION, "cpia_mini")
    write_records(layout, key, "mini_images", mini, schema.MINI_IMAGES, "cpia_mini")


def build_data_folder(root: Path) -> DataFolder:
    """Three partitions: wsi-breast (2 XL tiles), wsi-colon (1 XL tile, one failed slide) and
    roi-blood (4 S-scale ROI images), 22 kept images in all."""
    layout = DataLayout(root)
    catalog = Catalog(
        path=root / "catalog.yaml",
        subdatasets=(
            entry(
                "wsi-breast", "wsi", "breast", published_counts={"XL": 4, "L": 16, "M": 40, "S": 2}
            ),
            entry("wsi-colon", "wsi", "colon"),  # nothing published
            entry(
                "roi-blood",
                "roi",
                "blood",
                scale="S",
                labelled=True,
                published_counts={"M": 0, "S": 8},
            ),
        ),
    )
    write_wsi_partition(layout, "wsi-breast", "BRS-0001", [(0, 0), (1, 0)])
    write_wsi_partition(layout, "wsi-colon", "COL-0001", [(0, 1)])
    failure = {"file": "raw/wsi-colon/COL-0002.svs", "stage": "standardized_wsi",
               "reason": "raw/wsi-colon/COL-0002.svs: no MPP in the slide's metadata"}  # fmt: skip
    write_records(layout, "wsi-colon", "failures-standardized_wsi", [failure], schema.FAILURES,
                  "standardized_wsi")  # fmt: skip
    write_records(layout, "wsi-breast", "failures-scale_tiles", [], schema.FAILURES, "scale_tiles")
    write_roi_partition(layout, "roi-blood", 4)
    return DataFolder(layout, catalog)


def loaded_at(layout: DataLayout) -> dict[str, Any]:
    with duckdb.connect(str(layout.duckdb_path), read_only=True) as con:
        return dict(con.execute("SELECT file, loaded_at FROM manifest_files").fetchall())
