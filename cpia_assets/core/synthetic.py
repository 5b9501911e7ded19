"""Synthetic H&E-like sources for the demo catalog and the tests: no network, deterministic.

Slides are pyramidal tiled TIFFs (JPEG) whose resolution tags carry the MPP, so OpenSlide reads
them as generic TIFF slides with `openslide.mpp-x/y`. Tissue islands sit on a white background.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyvips
from PIL import Image

from cpia_assets.core.fsutil import atomic_path

BACKGROUND = (243, 242, 245)
STROMA = (232, 150, 190)
NUCLEUS = (105, 55, 150)
_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF"}


def he_texture(width: int, height: int, seed: int, tissue_fraction: float = 0.5) -> pyvips.Image:
    """An RGB uint8 image: pink stroma with purple nuclei over islands, white elsewhere."""
    cell = 256
    coarse = pyvips.Image.gaussnoise(
        width // cell + 3, height // cell + 3, sigma=1.0, mean=0.0, seed=seed
    )
    coarse = coarse.gaussblur(0.8).resize(cell, kernel="linear")
    # A threshold at the (1 - fraction) quantile of a unit normal gives that tissue fraction.
    threshold = _normal_quantile(1.0 - tissue_fraction)
    tissue = coarse.crop(cell, cell, width, height) > threshold
    # Nuclei: blobs about 10 px across covering ~10% of the tissue.
    grain = pyvips.Image.gaussnoise(
        width // 6 + 2, height // 6 + 2, sigma=1.0, mean=0.0, seed=seed + 1
    )
    nuclei = grain.resize(6, kernel="linear").crop(0, 0, width, height) > 1.3
    shade = pyvips.Image.gaussnoise(width, height, sigma=8.0, mean=0.0, seed=seed + 2)
    stroma = (shade + list(STROMA)).cast("uchar")
    nucleus = (shade + list(NUCLEUS)).cast("uchar")
    background = (
        pyvips.Image.gaussnoise(width, height, sigma=2.0, mean=0.0, seed=seed + 3) + BACKGROUND
    )
    tissue_rgb = nuclei.ifthenelse(nucleus, stroma)
    return tissue.ifthenelse(tissue_rgb, background.cast("uchar")).copy(interpretation="srgb")


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6))


def write_slide(path: Path, image: pyvips.Image, mpp: float, quality: int = 90) -> Path:
    """Write a pyramidal tiled JPEG TIFF whose resolution tags give `mpp` um/px.

    BigTIFF when the file could pass classic TIFF's 4 GB offsets: judged on the uncompressed
    pixels plus a third for the pyramid (OpenSlide reads both)."""
    pixels_per_mm = 1000.0 / mpp
    could_exceed_4gb = image.width * image.height * image.bands * 4 // 3 >= 1 << 32
    with atomic_path(path) as tmp:
        image.tiffsave(
            str(tmp),
            tile=True,
            tile_width=256,
            tile_height=256,
            pyramid=True,
            compression="jpeg",
            Q=quality,
            xres=pixels_per_mm,
            yres=pixels_per_mm,
            resunit="cm",
            bigtiff=could_exceed_4gb,
        )
    return path


def generate_source(spec: Mapping[str, Any], dest: Path) -> list[Path]:
    """Create the files of a `{type: synthetic}` source under `dest`; existing files are kept."""
    recipe = spec.get("recipe")
    if recipe == "wsi":
        return _generate_slides(spec, dest)
    if recipe == "roi":
        return _generate_rois(spec, dest)
    raise ValueError(f"synthetic source: unknown recipe {recipe!r} (expected 'wsi' or 'roi')")


def _generate_slides(spec: Mapping[str, Any], dest: Path) -> list[Path]:
    written = []
    for slide in spec["slides"]:
        path = dest / f"{slide['name']}.tiff"
        if not path.exists():
            image = he_texture(int(slide["width"]), int(slide["height"]), int(slide["seed"]))
            write_slide(path, image, float(slide["mpp"]))
        written.append(path)
    return written


def _generate_rois(spec: Mapping[str, Any], dest: Path) -> list[Path]:
    """ROI images of assorted sizes and formats in `<split>/<class>/` folders, or flat + CSV."""
    seed = int(spec.get("seed", 0))
    formats = (".png", ".jpg", ".bmp", ".tif")
    rows = []
    written = []
    index = 0
    for magnification in spec.get("magnifications") or [None]:
        for split, count in spec["per_split"].items():
            for label in spec["classes"]:
                for _ in range(int(count)):
                    index += 1
                    width, height = 300 + (index * 37) % 260, 260 + (index * 53) % 220
                    suffix = formats[index % len(formats)]
                    name = f"{label}_{index:04d}{suffix}"
                    if spec.get("layout") == "csv":
                        relative = Path(magnification or "") / name
                    else:
                        relative = Path(split) / label / name
                    path = dest / relative
                    if not path.exists():
                        path.parent.mkdir(parents=True, exist_ok=True)
                        image = he_texture(width, height, seed + index, tissue_fraction=0.9)
                        with atomic_path(path) as tmp:
                            Image.fromarray(image.numpy()).save(tmp, format=_PIL_FORMATS[suffix])
                    rows.append({"image": relative.as_posix(), "label": label, "split": split})
                    written.append(path)
    if spec.get("layout") == "csv":
        labels = dest / "labels.csv"
        with atomic_path(labels) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "label", "split"])
            writer.writeheader()
            writer.writerows(rows)
        written.append(labels)
    return written
