"""One ROI image: decoded, centre-cropped to a square and resized, with bounded memory.

Geometry (the paper's rule for ROIs): the largest centred square of the image, or with the entry's
`crop: {fraction: f}` a centred square of f x the short side (microscope fields of view, e.g. 5/7
for thick blood smears). Odd leftovers fall right and below: left = (width - side) // 2. The
square is resized to `RoiSettings.size` with Lanczos (the published scripts' PIL ANTIALIAS);
squares smaller than the size are enlarged and flagged `upscaled`.

Decoding and memory: a square larger than the output is cropped and resized by libvips as a
row stream (JPEG also shrunk on load by 2, 4 or 8 while the square keeps 16x the output size), so
a worker holds little more than the output's pixels whatever the input's size (a 13000 x 13000
RGBA PNG: 3.3 GB peak RSS and 9 s with a full Pillow decode, 0.2 GB and 5 s this way). Squares
to be enlarged or kept and formats libvips cannot read (BMP) are decoded whole by Pillow. No
worker decodes an image of more than `RoiSettings.max_pixels` pixels: such an image is a
failure naming its size and the setting.

Pixels: EXIF orientation is applied; grayscale becomes RGB; 16-bit samples are scaled to 8 bits
(value / 257; 32-bit integer greyscale, Pillow mode I, is read as 16-bit data); alpha and palette
or colour-key transparency are composited on white; multi-page files give their first page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips
from PIL import Image, ImageOps

_ALGORITHM_VERSION = 2
"""Part of every stamp: bump it when a change to this module changes the pixels it writes."""
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class RoiImageError(ValueError):
    """One source image that cannot be decoded; it is recorded as a failure and skipped."""


@dataclass(frozen=True)
class RoiSettings:
    """How ROI images are standardized.

    `jpeg_quality` defaults to 90; the published CPIA scripts saved with Pillow's default, 75.
    `chunk_size` is the number of images per work item sent to the executor. `max_pixels`
    bounds the source images a worker decodes (width x height; larger ones fail): with
    shrink-on-load this bounds time, and memory for the images Pillow decodes whole.
    """

    size: int = 384
    jpeg_quality: int = 90
    chunk_size: int = 32
    max_pixels: int = 400_000_000

    def __post_init__(self) -> None:
        if min(self.size, self.chunk_size, self.max_pixels) < 1 or not (
            1 <= self.jpeg_quality <= 100
        ):
            raise ValueError(
                f"bad ROI settings {self}: size, chunk_size and max_pixels >= 1, quality 1-100"
            )

    def fingerprint(self, crop_fraction: float) -> str:
        """Everything that decides an output's pixels, as stored in its stamp."""
        return (
            f"v{_ALGORITHM_VERSION};size={self.size};quality={self.jpeg_quality};"
            f"crop={crop_fraction:g};lanczos"
        )


def crop_box(width: int, height: int, *, fraction: float = 1.0) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square of `fraction` x the short side."""
    side = max(1, round(min(width, height) * fraction))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (itself if it already is): 16-bit scaled, alpha on white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(samples / 257), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, "white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def standardize_image(
    image: Image.Image, *, size: int, crop_fraction: float = 1.0
) -> tuple[Image.Image, bool]:
    """The centred square of an RGB image resized to size x size, and whether it was enlarged."""
    box = crop_box(image.width, image.height, fraction=crop_fraction)
    square = image.crop(box)
    upscaled = square.width < size
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return square, upscaled


_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
"""EXIF orientations that swap width and height."""

_JPEG_SHRINKS = (8, 4, 2)
"""Shrink-on-load factors of libvips' JPEG loader (DCT scaling)."""

_SHRINK_MARGIN = 16
"""Shrink on load only while the square keeps 16x the output size: the DCT-domain shrink then
stays within Pillow's tolerance, and the crop's rounding to shrunk pixels moves it by at most
1/32 of an output pixel."""

_LANCZOS_MIN_FACTOR = 8
"""libvips box-averages by an integer block first (which keeps the Lanczos kernel short) but
leaves at least this factor to Lanczos-3: larger blocks move pixels visibly away from Pillow's
Lanczos."""


def load_square(
    path: Path, *, size: int, crop_fraction: float = 1.0, max_pixels: int
) -> tuple[Image.Image, bool]:
    """The standardized square of one image file and whether it was enlarged (module docstring:
    libvips streams and shrinks what it can, Pillow decodes the rest whole); RoiImageError if
    the file cannot be decoded or has more than `max_pixels` pixels."""
    try:
        header = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="truncated")
    except pyvips.Error:  # a format libvips cannot read, or a corrupt file: Pillow decides
        header = None
    if header is not None:
        orientation = _orientation(header)
        width, height = header.width, header.height
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        _check_pixels(path, width, height, max_pixels)
        box = crop_box(width, height, fraction=crop_fraction)
        if box[2] - box[0] > size:
            stored_box = _stored_box(box, header.width, header.height, orientation)
            try:
                square = _vips_square(path, header, stored_box, size).copy_memory()
                return Image.fromarray(square.autorot().numpy(), "RGB"), False
            except pyvips.Error as exc:
                raise RoiImageError(f"{path}: cannot decode image: {exc}".strip()) from exc
    image = load_rgb(path, max_pixels=max_pixels)
    return standardize_image(image, size=size, crop_fraction=crop_fraction)


def _orientation(image: pyvips.Image) -> int:
    return int(image.get("orientation")) if image.get_typeof("orientation") else 1


def _stored_box(
    box: tuple[int, int, int, int], width: int, height: int, orientation: int
) -> tuple[int, int, int, int]:
    """`box` of the upright image mapped onto the stored pixels of an image with this EXIF
    orientation (`width` x `height` stored)."""
    left, top, right, bottom = box
    return {
        2: (width - right, top, width - left, bottom),
        3: (width - right, height - bottom, width - left, height - top),
        4: (left, height - bottom, right, height - top),
        5: (top, left, bottom, right),
        6: (top, height - right, bottom, height - left),
        7: (width - bottom, height - right, width - top, height - left),
        8: (width - bottom, left, width - top, right),
    }.get(orientation, box)


def _vips_square(
    path: Path, header: pyvips.Image, box: tuple[int, int, int, int], size: int
) -> pyvips.Image:
    """The stored pixels of `box` resized to size x size (Lanczos-3) as 8-bit RGB, decoded as a
    row stream, JPEG shrunk on load by the largest factor that keeps `_SHRINK_MARGIN`."""
    side = box[2] - box[0]
    image, shrink = header, 1
    if header.get("vips-loader").startswith("jpegload"):
        shrink = next((k for k in _JPEG_SHRINKS if side >= _SHRINK_MARGIN * k * size), 1)
        if shrink > 1:
            image = pyvips.Image.new_from_file(
                str(path), access="sequential", fail_on="truncated", shrink=shrink
            )
    left, top = round(box[0] / shrink), round(box[1] / shrink)
    edge = min(round(side / shrink), image.width - left, image.height - top)
    square = _vips_rgb(image.crop(left, top, edge, edge))
    block = int(edge / size / _LANCZOS_MIN_FACTOR)
    if block > 1:
        square = square.shrink(block, block)
    # On float samples, rounded at the end as Pillow does: libvips' 8-bit reduce runs darker.
    square = square.cast("float").reduce(
        square.width / size, square.height / size, kernel="lanczos3"
    )
    return square.rint().cast("uchar").crop(0, 0, size, size)


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise RoiImageError(
            f"{path}: {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (roi.max_pixels in the run config of standardized_wsi)"
        )


def _vips_rgb(image: pyvips.Image) -> pyvips.Image:
    """`to_rgb` for libvips images: 8-bit sRGB, alpha composited on white, 16-bit (and wider
    integer) samples divided by 257."""
    if image.interpretation == "cmyk":
        image = image.colourspace("srgb")
    sixteen_bit = image.format != "uchar"
    if image.hasalpha():
        white = 65535 if sixteen_bit else 255
        image = image.flatten(background=[white] * (image.bands - 1), max_alpha=white)
    if sixteen_bit:
        image = (image / 257).rint().cast("uchar")
    return image.bandjoin([image, image]) if image.bands == 1 else image


def load_rgb(path: Path, *, max_pixels: int) -> Image.Image:
    """Decode an image file fully as upright 8-bit RGB; RoiImageError if it cannot be read or
    has more than `max_pixels` pixels."""
    try:
        # Closing our handle (not the image) keeps the decoded pixels usable after the block.
        with Path(path).open("rb") as handle:
            image = Image.open(handle)
            _check_pixels(path, image.width, image.height, max_pixels)
            image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)
    except RoiImageError:
        raise
    # Decoders raise many exception types on corrupt data (OSError, SyntaxError, ValueError,
    # struct.error, ...): any of them means this one file is unusable.
    except Exception as exc:
        raise RoiImageError(f"{path}: cannot decode image: {type(exc).__name__}: {exc}") from exc
