"""Column schemas of the per-partition Parquet records: the contract between pipeline stages.

Every partitioned stage writes its records with these schemas under `manifests/<key>/`;
`tile_manifest` loads them into DuckDB. Paths are relative to the data folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import polars as pl

TILES = {
    "image_name": pl.String,  # file stem, e.g. TCGA-A2-A0EY-01A-01-BSA-960-39-6
    "subdataset": pl.String,  # partition key
    "kind": pl.String,  # wsi | roi
    "scale": pl.String,  # XL | L | M | S
    "size_px": pl.Int32,  # edge of the saved image in pixels
    "x": pl.Int32,  # WSI tile index: top-left at (size_px * x, size_px * y); null for ROIs
    "y": pl.Int32,
    "source_file": pl.String,  # the raw source file (slide or ROI image)
    "source_sha256": pl.String,
    "standardized_file": pl.String,  # WSI: the standardized slide; ROI: null
    "path": pl.String,  # the saved image; null for rejected tiles
    "parent_image": pl.String,  # L/M from XL, S from M; null for XL and ROIs
    "label": pl.String,
    "split": pl.String,  # train | val | test | none
    "bytes": pl.Int64,
    "phash": pl.Int64,  # pHash of the saved image, signed 64 bits (`perceptual`); null: rejected
    "cut_from": pl.String,  # WSI pixels: resampled (fused, one JPEG generation) | standardized_tiff
    "upscaled": pl.Boolean,  # ROI smaller than the output size
    "mean_r": pl.Float32,
    "mean_g": pl.Float32,
    "mean_b": pl.Float32,
    "tissue_fraction": pl.Float32,
    "saturation": pl.Float32,
    "blur": pl.Float32,
    "in_mini": pl.Boolean,
    "mini_reason": pl.String,  # a MiniReason; null: Mini not built
}

MINI_IMAGES = {
    "image_name": pl.String,  # the source tile's name (S: its 96 px cell's, `-mini` if not in CPIA)
    "subdataset": pl.String,
    "kind": pl.String,  # wsi | roi
    "scale": pl.String,  # XL | L | M | S
    "size_px": pl.Int32,  # edge of the Mini image (384)
    "source_size_px": pl.Int32,  # edge of the pixels it was made from (3840, 960, 384, 96)
    "x": pl.Int32,  # grid position of those pixels, as in TILES (S: the chosen 96 px cell)
    "y": pl.Int32,
    "source_tile": pl.String,  # the full-CPIA image of these pixels (S crop: the S tile, else M)
    "source_path": pl.String,  # its file
    "source_file": pl.String,  # the raw source file (slide or ROI image)
    "parent_image": pl.String,  # Mini parent: L and M from XL, S from M; null for XL and ROIs
    "path": pl.String,  # the Mini image under cpia-mini/
    "label": pl.String,
    "split": pl.String,
    "bytes": pl.Int64,
    "phash": pl.Int64,  # pHash of the Mini image (linked: its source tile's; `perceptual`)
    "resample": pl.String,  # area | lanczos | none (linked unchanged)
}

MINI_SELECTION = {
    "image_name": pl.String,  # every kept full-CPIA image of the partition
    "scale": pl.String,
    "in_mini": pl.Boolean,
    "mini_reason": pl.String,
}

SLIDES = {
    "source_file": pl.String,
    "source_bytes": pl.Int64,
    "source_sha256": pl.String,
    "vendor": pl.String,
    "width": pl.Int64,  # level 0
    "height": pl.Int64,
    "mpp_x": pl.Float64,
    "mpp_y": pl.Float64,
    "mpp_origin": pl.String,  # openslide | vendor:<key> | tiff-tags | override | objective-power
    "level": pl.Int32,  # pyramid level read
    "level_downsample": pl.Float64,
    "scale_factor": pl.Float64,  # output px per level-0 px (x); > 1 enlarges
    "resampled": pl.Boolean,
    "target_mpp": pl.Float64,
    "standardized_file": pl.String,
    "std_width": pl.Int64,
    "std_height": pl.Int64,
}

RAW_FILES = {
    "rel_path": pl.String,  # relative to raw/<key>/
    "bytes": pl.Int64,
    "sha256": pl.String,
    "source": pl.String,  # URL, file id or local path it came from
    "fetched_at": pl.Datetime("us", "UTC"),
}

FAILURES = {
    "file": pl.String,
    "stage": pl.String,
    "reason": pl.String,
}

SKIPPED = {
    "file": pl.String,  # a raw file a standardizing stage leaves out on purpose
    "reason": pl.String,  # e.g. "not a slide file (.txt)", "data file of the MIRAX slide x.mrxs"
}


class MiniReason:
    """Values of `mini_reason`: why an image is in CPIA-Mini or not."""

    SELECTED = "selected"
    NOT_SELECTED = "not selected"
    EVAL_SPLIT = "val/test split"  # of a labelled ROI set
    EXCLUDED = "excluded for evaluation"
    BLANK = "blank"  # rejected candidates (set by the manifest load)


RUN_COLUMNS = {"run_id": pl.String, "code_version": pl.String}
"""Added by the Dagster shell to every record it writes, for lineage."""


def frame(rows: Iterable[Mapping[str, Any]], schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Rows as a DataFrame with exactly `schema`'s columns (missing keys become null)."""
    rows = list(rows)
    data = {name: [row.get(name) for row in rows] for name in schema}
    return pl.DataFrame(data, schema=dict(schema))
