"""The per-slide UI thumbnail: kept XL tiles outlined, rejected XL candidates shaded."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pyvips
from PIL import Image

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.wsi.thumbnails import KEPT_OUTLINE, slide_thumbnail, thumbnails_markdown

GREY = 200


def _slide(tmp_path: Path) -> Path:
    path = tmp_path / "standardized" / "k" / "s1.tiff"
    path.parent.mkdir(parents=True)
    pixels = np.full((400, 800, 3), GREY, dtype=np.uint8)
    pyvips.Image.new_from_array(pixels, interpretation="srgb").tiffsave(str(path))
    return path


def _row(x: int, y: int) -> dict:
    return {"scale": "XL", "x": x, "y": y, "size_px": 200,
            "standardized_file": "standardized/k/s1.tiff"}  # fmt: skip


def test_kept_tiles_are_outlined_and_rejected_ones_shaded(tmp_path: Path) -> None:
    image = np.asarray(slide_thumbnail(_slide(tmp_path), [_row(0, 0)], [_row(2, 1)], width=400))
    assert image.shape == (200, 400, 3)  # half size: a 200 px tile is 100 px
    assert tuple(image[0, 50]) == KEPT_OUTLINE  # top edge of the kept tile
    assert tuple(image[50, 50]) == (GREY, GREY, GREY)  # its inside is untouched
    shaded = image[150, 250]
    assert shaded[0] > GREY and shaded[1] < GREY  # reddened
    assert tuple(image[150, 50]) == (GREY, GREY, GREY)  # elsewhere untouched


def test_markdown_holds_one_png_per_slide_with_counts(tmp_path: Path) -> None:
    _slide(tmp_path)
    text = thumbnails_markdown(DataLayout(tmp_path), [_row(0, 0), _row(1, 0)], [_row(2, 1)])
    assert text.startswith("`s1.tiff`: 2 XL kept, 1 rejected")
    png = base64.b64decode(text.split("data:image/png;base64,")[1].rstrip(")"))
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.width == 320
    assert thumbnails_markdown(DataLayout(tmp_path), [], []) == "No slide tiled."
