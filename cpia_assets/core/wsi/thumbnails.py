"""Per-slide thumbnails for the UI: the standardized slide, small, with every kept XL tile
outlined and every rejected XL candidate shaded, so a user sees at a glance where the tiles came
from and what the tissue test left out."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyvips
from PIL import Image, ImageDraw

from cpia_assets.core.layout import DataLayout

KEPT_OUTLINE = (0, 170, 60)
REJECTED_SHADE = (220, 40, 40, 90)  # RGBA: translucent over the tissue
THUMBNAIL_WIDTH = 320
SLIDES_SHOWN = 3


def slide_thumbnail(
    slide: Path, kept: Sequence[Mapping[str, Any]], rejected: Sequence[Mapping[str, Any]],
    *, width: int = THUMBNAIL_WIDTH,
) -> Image.Image:  # fmt: skip
    """The slide at `width` px with kept XL tiles outlined and rejected XL candidates shaded
    (rows: TILES records of scale XL, grid position `x`, `y` and edge `size_px`)."""
    full_width = pyvips.Image.new_from_file(str(slide)).width
    small = pyvips.Image.thumbnail(str(slide), width)
    image = Image.fromarray(small.numpy()[..., :3]).convert("RGBA")
    scale = small.width / full_width
    shade = Image.new("RGBA", image.size, (0, 0, 0, 0))
    shade_draw, draw = ImageDraw.Draw(shade), ImageDraw.Draw(image)
    for row in rejected:
        shade_draw.rectangle(_box(row, scale), fill=REJECTED_SHADE)
    image = Image.alpha_composite(image, shade)
    draw = ImageDraw.Draw(image)
    for row in kept:
        draw.rectangle(_box(row, scale), outline=KEPT_OUTLINE, width=2)
    return image.convert("RGB")


def thumbnails_markdown(
    layout: DataLayout, records: Sequence[Mapping[str, Any]],
    rejected: Sequence[Mapping[str, Any]], *, slides: int = SLIDES_SHOWN,
) -> str:  # fmt: skip
    """Markdown with one PNG thumbnail per slide (the first `slides` by name) as data: URIs."""
    kept_xl = _xl_by_slide(records)
    rejected_xl = _xl_by_slide(rejected)
    names = sorted(set(kept_xl) | set(rejected_xl))
    if not names:
        return "No slide tiled."
    parts = []
    for name in names[:slides]:
        kept, shaded = kept_xl.get(name, []), rejected_xl.get(name, [])
        image = slide_thumbnail(layout.root / name, kept, shaded)
        title = f"`{Path(name).name}`: {len(kept)} XL kept, {len(shaded)} rejected"
        parts.append(f"{title}\n\n![{Path(name).stem}]({_png_uri(image)})")
    if len(names) > slides:
        parts.append(f"... and {len(names) - slides} more slides")
    return "\n\n".join(parts)


def _xl_by_slide(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    found: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["scale"] == "XL" and row.get("standardized_file"):
            found.setdefault(row["standardized_file"], []).append(row)
    return found


def _box(row: Mapping[str, Any], scale: float) -> tuple[float, float, float, float]:
    size = row["size_px"] * scale
    left, top = row["x"] * size, row["y"] * size
    return left, top, left + size - 1, top + size - 1


def _png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
