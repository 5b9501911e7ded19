"""A picture like the paper's Fig. 3: sample images per sub-dataset (rows) and scale (columns)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
from PIL import Image, ImageDraw, ImageFont

from cpia_assets.core.catalog.fields import ALL_SCALES
from cpia_assets.core.fsutil import atomic_path
from cpia_assets.core.layout import DataLayout

BACKGROUND = (255, 255, 255)
EMPTY_CELL = (236, 236, 236)
UNREADABLE = (200, 60, 60)
TEXT = (20, 20, 20)


def mosaic_path(layout: DataLayout) -> Path:
    """Where the mosaic is kept: beside manifest.duckdb."""
    return layout.duckdb_path.with_name("manifest-mosaic.png")


@dataclass(frozen=True)
class MosaicStyle:
    samples: int = 3  # images per cell
    thumb_px: int = 96
    gap_px: int = 4
    label_px: int = 220  # width of the row-label column
    header_px: int = 28


def mosaic_samples(
    con: duckdb.DuckDBPyConnection, *, samples: int
) -> list[tuple[str, str, str, list[str]]]:
    """(sub-dataset key, row label, scale, sample paths) in Table I organ order.

    The samples are the kept images whose names hash lowest: stable across reloads, spread
    over the slides, and found in one pass over the table.
    """
    return con.execute(
        """
        WITH picks AS (
            SELECT subdataset, scale, min_by(path, hash(image_name), ?) AS paths
            FROM tiles WHERE path IS NOT NULL GROUP BY ALL
        )
        SELECT p.subdataset, coalesce(d.name || ' (' || d.organ || ')', p.subdataset),
               p.scale, p.paths
        FROM picks p
        LEFT JOIN subdatasets d ON d.key = p.subdataset
        LEFT JOIN organs o ON o.organ = d.organ
        ORDER BY o.position NULLS LAST, p.subdataset, p.scale
        """,
        [samples],
    ).fetchall()


def build_mosaic(
    con: duckdb.DuckDBPyConnection,
    layout: DataLayout,
    destination: Path,
    *,
    style: MosaicStyle = MosaicStyle(),
) -> Path:
    """Draw the mosaic as a PNG at `destination` (atomically); returns its path.

    A missing or unreadable image leaves a red square instead of failing the picture.
    """
    rows: dict[str, tuple[str, dict[str, list[str]]]] = {}
    for key, label, scale, paths in mosaic_samples(con, samples=style.samples):
        rows.setdefault(key, (label, {}))[1][scale] = paths
    cell_px = style.samples * (style.thumb_px + style.gap_px) + style.gap_px
    row_px = style.thumb_px + 2 * style.gap_px
    width = style.label_px + cell_px * len(ALL_SCALES)
    height = style.header_px + row_px * max(len(rows), 1)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    for column, scale in enumerate(ALL_SCALES):
        draw.text((style.label_px + column * cell_px + style.gap_px, 6), scale, TEXT, font=font)
    for row, (label, by_scale) in enumerate(rows.values()):
        top = style.header_px + row * row_px
        draw.text((style.gap_px, top + row_px // 2 - 8), label[:28], TEXT, font=font)
        for column, scale in enumerate(ALL_SCALES):
            left = style.label_px + column * cell_px
            paths = by_scale.get(scale, [])
            for slot in range(style.samples):
                origin = (left + style.gap_px + slot * (style.thumb_px + style.gap_px),
                          top + style.gap_px)  # fmt: skip
                if slot < len(paths):
                    canvas.paste(_thumbnail(layout.root / paths[slot], style.thumb_px), origin)
                else:
                    canvas.paste(EMPTY_CELL, (*origin, *(o + style.thumb_px for o in origin)))
    with atomic_path(destination) as tmp:
        canvas.save(tmp, format="PNG")
    return destination


def _thumbnail(path: Path, edge: int) -> Image.Image:
    """A square thumbnail; JPEG draft mode decodes big tiles at 1/2 to 1/8 size, fast."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (edge, edge))
            thumb = image.convert("RGB").resize((edge, edge), Image.Resampling.BILINEAR)
    except (OSError, ValueError):
        thumb = Image.new("RGB", (edge, edge), UNREADABLE)
    return thumb


def preview_data_uri(png: Path, *, max_width: int = 640) -> str:
    """A small JPEG of the mosaic as a data: URI, for an inline markdown image."""
    with Image.open(png) as image:
        scale = min(1.0, max_width / image.width)
        small = image.convert("RGB").resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.Resampling.LANCZOS,
        )
    return _jpeg_data_uri(small, quality=70)


def _jpeg_data_uri(image: Image.Image, *, quality: int) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def preview_grid_uri(rows: Mapping[str, Sequence[Path]], *, thumb_px: int = 64) -> str:
    """A small grid, one labelled row of thumbnails per key of `rows`, as a JPEG data: URI."""
    gap, label_px = 4, 40
    width = label_px + max((len(paths) for paths in rows.values()), default=0) * (thumb_px + gap)
    height = max(len(rows), 1) * (thumb_px + gap)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    for row, (label, paths) in enumerate(rows.items()):
        top = row * (thumb_px + gap)
        draw.text((gap, top + thumb_px // 2 - 8), label, TEXT, font=font)
        for column, path in enumerate(paths):
            canvas.paste(_thumbnail(path, thumb_px), (label_px + column * (thumb_px + gap), top))
    return _jpeg_data_uri(canvas, quality=80)
