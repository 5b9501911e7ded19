"""Synthetic sources for the demo catalog and the tests: no network, deterministic.

The pixels are real H&E: a crop of OpenSlide's CMU-1 test slide shipped with the package
(`data/cmu1_he_crop.jpg`, CC0, see the licence note beside it), resampled to the requested
resolution and mirror-tiled (flipped copies meet without seams). Tissue islands of it sit on a
near-white glass background, so slides also hold blank areas that the tissue test rejects.

Slides are pyramidal tiled TIFFs (JPEG) whose resolution tags carry the MPP, so OpenSlide reads
them as generic TIFF slides with `openslide.mpp-x/y`.

Labelled ROI images carry their class in their pixels: class k of a source's `classes` is the
same real tissue magnified `CLASS_ZOOM`**k times, so the classes differ in texture scale, as
a learnable evaluation task needs, while every image stays real H&E.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pyvips
from PIL import Image

from cpia_assets.core.fsutil import atomic_path

BACKGROUND = (243, 242, 245)
HE_SAMPLE_MPP = 0.499
"""Microns per pixel of the shipped crop (CMU-1-Small-Region's level 0)."""
GLASS_PATCH = 509
"""Edge of the glass noise patch that `glass` mirror-tiles: its period, 1,018 px, is no multiple
of a 256 px tile."""
CLASS_ZOOM = 4.0
"""Magnification between consecutive classes of a synthetic labelled ROI source."""
_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF"}
_PNG_LEVEL = 1
"""zlib level of ROI PNGs: the same pixels as Pillow's default 6, written about 20x faster."""


@cache
def he_sample() -> pyvips.Image:
    """The shipped real H&E crop (RGB uint8, at `HE_SAMPLE_MPP`)."""
    data = (resources.files("cpia_assets") / "data" / "cmu1_he_crop.jpg").read_bytes()
    return pyvips.Image.new_from_buffer(data, "").copy_memory()


@cache
def _sample_at(mpp: float) -> pyvips.Image:
    """The shipped crop resampled to `mpp` um/px, once per resolution."""
    sample = he_sample()
    if mpp == HE_SAMPLE_MPP:
        return sample
    return sample.resize(HE_SAMPLE_MPP / mpp, kernel="lanczos3").copy_memory()


def mirror_tile(
    sample: pyvips.Image, width: int, height: int, *, left: int = 0, top: int = 0
) -> pyvips.Image:
    """A width x height image cut at (left, top) from `sample` tiled with its mirror images."""
    row = sample.join(sample.flip("horizontal"), "horizontal")
    block = row.join(row.flip("vertical"), "vertical")
    left, top = left % block.width, top % block.height
    across = (left + width) // block.width + 1
    down = (top + height) // block.height + 1
    tiled = block.replicate(across, down).crop(left, top, width, height)
    return tiled.copy(interpretation="srgb")


def he_texture(
    width: int, height: int, seed: int, tissue_fraction: float = 0.5, mpp: float = HE_SAMPLE_MPP
) -> pyvips.Image:
    """An RGB uint8 image at `mpp` um/px: real H&E tissue over islands covering about
    `tissue_fraction` of it, near-white glass elsewhere. `seed` picks the islands and where the
    mirror-tiled tissue starts."""
    sample = _sample_at(mpp)
    # Different seeds start the mirror-tiled tissue at different places (arbitrary strides).
    tissue_rgb = mirror_tile(sample, width, height, left=seed * 389, top=seed * 241)
    cell = 256
    coarse = pyvips.Image.gaussnoise(
        width // cell + 3, height // cell + 3, sigma=1.0, mean=0.0, seed=seed
    )
    coarse = coarse.gaussblur(0.8).resize(cell, kernel="linear")
    # A threshold at the (1 - fraction) quantile of a unit normal gives that tissue fraction.
    threshold = _normal_quantile(1.0 - tissue_fraction)
    tissue = coarse.crop(cell, cell, width, height) > threshold
    return tissue.ifthenelse(tissue_rgb, glass(width, height, seed + 3)).copy(interpretation="srgb")


def glass(width: int, height: int, seed: int) -> pyvips.Image:
    """Near-white glass: `BACKGROUND` with Gaussian noise (sigma 2), cut from the mirror-tiled
    `_glass_patch` where `seed` says (a new noise field for each image costs seconds a slide)."""
    return mirror_tile(_glass_patch(), width, height, left=seed * 97, top=seed * 61)


@cache
def _glass_patch() -> pyvips.Image:
    noise = pyvips.Image.gaussnoise(GLASS_PATCH, GLASS_PATCH, sigma=2.0, mean=0.0, seed=0)
    return (noise + BACKGROUND).cast("uchar").copy_memory()


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
            mpp = float(slide["mpp"])
            image = he_texture(
                int(slide["width"]), int(slide["height"]), int(slide["seed"]), mpp=mpp
            )
            write_slide(path, image, mpp)
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
            for number, label in enumerate(spec["classes"]):
                mpp = HE_SAMPLE_MPP / CLASS_ZOOM**number
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
                        image = he_texture(
                            width, height, seed + index, tissue_fraction=0.9, mpp=mpp
                        )
                        with atomic_path(path) as tmp:
                            pixels = Image.fromarray(image.numpy())
                            pixels.save(tmp, _PIL_FORMATS[suffix], compress_level=_PNG_LEVEL)
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
