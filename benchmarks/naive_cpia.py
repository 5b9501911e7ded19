"""The naive baseline: CPIA's published WSI script, as it works, for benchmarking only.

Per slide: for each XL grid cell, OpenSlide `read_region` of round(3840 * ratio) level-0 pixels,
PIL Lanczos resize to 3840 (skipped when the ratio is within 10%), the published mean-colour XL
rule, then PIL crops and JPEG saves (quality 75) of the 4x4 L and 10x10 M grids with the
published blank rule, and one S crop (sub-tile #10) per kept M tile. Two deliberate departures
so that it cuts the same grid as ours: the target MPP is a parameter, and the first and last
rows and columns of XL tiles are not skipped.
"""

from __future__ import annotations

from pathlib import Path

import openslide
from PIL import Image

XL, L, M, S = 3840, 960, 384, 96


def _mean(image: Image.Image) -> tuple[int, int, int]:
    return image.resize((1, 1), Image.Resampling.BILINEAR).getpixel((0, 0))


def _is_tissue_xl(image: Image.Image) -> bool:
    r, g, b = _mean(image)
    return r < 220 and g < 220 and b < 220 and r > 100 and b > 30 and r > g + 20


def _is_blank(image: Image.Image) -> bool:
    r, g, b = _mean(image)
    return r > 220 and g > 220 and b > 220


def process_slide(slide_path: str, out_dir: str, target_mpp: float = 0.491) -> int:
    """Tile one slide the published way; returns the number of images written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(slide_path).name.split(".", 1)[0]
    slide = openslide.OpenSlide(slide_path)
    ratio = target_mpp / float(slide.properties["openslide.mpp-x"])
    region = round(XL * ratio)
    width, height = slide.dimensions
    written = 0
    for row in range(height // region):
        for column in range(width // region):
            xl = slide.read_region((column * region, row * region), 0, (region, region))
            xl = xl.convert("RGB")
            if not 0.9 < ratio < 1.1:
                xl = xl.resize((XL, XL), Image.Resampling.LANCZOS)
            if not _is_tissue_xl(xl):
                continue
            xl.save(out / f"{stem}-{XL}-{column}-{row}.jpg", quality=75)
            written += 1
            for size in (L, M):
                cells = XL // size
                for j in range(cells):
                    for i in range(cells):
                        tile = xl.crop((i * size, j * size, (i + 1) * size, (j + 1) * size))
                        if _is_blank(tile):
                            continue
                        x, y = column * cells + i, row * cells + j
                        tile.save(out / f"{stem}-{size}-{x}-{y}.jpg", quality=75)
                        written += 1
                        if size == M:
                            s_tile = tile.crop((S, 2 * S, 2 * S, 3 * S))  # sub-tile #10
                            if not _is_blank(s_tile):
                                sx, sy = x * 4 + 1, y * 4 + 2
                                s_tile.save(out / f"{stem}-{S}-{sx}-{sy}.jpg", quality=75)
                                written += 1
    slide.close()
    return written
