"""Perceptual hashes: the 64-bit DCT pHash of every written image, for near-duplicate search.

`phash` is `imagehash.phash` (grey, Lanczos to 32 x 32, 2-D DCT-II, the top-left 8 x 8
coefficients against their median), after a box reduce of images of 512 px or more a side to
256-511 px, as Pillow's `reducing_gap` does: beyond an 8x shrink Lanczos is an average anyway.
It moves a tissue tile's hash by at most 4 bits (960-3840 px); images up to 511 px, evaluation
images among them, hash exactly as imagehash hashes them. Hashes are signed 64-bit integers (the
two's complement of the 64 bits, first coefficient in the most significant bit) so that they
fit Polars Int64 and DuckDB BIGINT.

The computation is imagehash's and Pillow's, bit for bit, done faster: the box reduce of an
RGB array whose sides are multiples of the factor (4 or more) is Pillow's `Image.reduce`
rounding applied to block sums taken in numpy (`_reduce`: no Pillow copy of the whole image,
so a 3840 px tile hashes in ~20 ms instead of ~30-75 ms), and the DCT step is imagehash's
scipy calls without its object and hex-string round trip. `cpia_assets_tests/core/
test_perceptual.py` checks that the bits equal Pillow's reduce followed by `imagehash.phash`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NEAR_DUPLICATE_BITS = 6
"""Default largest Hamming distance of near-duplicates. Measured on the 78 tissue-rich 384 px
tiles of the two real test slides (q75 JPEGs): the same tile re-encoded at q30, q50 or q95, or
resized to 224 px (Lanczos, bilinear then q75, box), or shrunk to 96 px and enlarged again, lies
at most 4 bits away; distinct tiles at least 16 bits (3003 pairs). 6 leaves a margin on both
sides and keeps the block join of `manifest.leaks` fast (7 blocks of 9-10 bits)."""

_REDUCE_TO = 256
"""Images are box-reduced by an integer factor to no fewer than this many pixels a side."""
_NUMPY_REDUCE_FROM = 4
"""Smallest reduce factor done in numpy (`_reduce`); below it Pillow's own reduce is faster."""
_BITS = 64
_HASH_SIZE = 8
_IMAGE_SIZE = 32  # imagehash: hash_size * highfreq_factor (4)


def phash(image: np.ndarray | Image.Image) -> int:
    """The pHash (module docstring) of an RGB image (H x W x 3 uint8 pixels or a PIL image),
    as a signed 64-bit integer."""
    if isinstance(image, np.ndarray):
        factor = min(image.shape[:2]) // _REDUCE_TO
        if factor >= _NUMPY_REDUCE_FROM and _reducible(image, factor):
            return _grey_hash(Image.fromarray(_reduce(image, factor)))
        image = Image.fromarray(image)
    factor = min(image.size) // _REDUCE_TO
    if factor > 1:
        image = image.reduce(factor)
    return _grey_hash(image)


def phash_file(path: Path | str) -> int:
    """`phash` of an image file."""
    with Image.open(path) as image:
        return phash(image.convert("RGB"))


def hamming(a: int, b: int) -> int:
    """Bits in which two hashes differ."""
    return ((a ^ b) & ((1 << _BITS) - 1)).bit_count()


def _grey_hash(image: Image.Image) -> int:
    """`imagehash.phash(image)` as a signed 64-bit integer: the same calls, in the same order."""
    import scipy.fftpack  # as imagehash does: only when a hash is taken

    grey = image.convert("L").resize((_IMAGE_SIZE, _IMAGE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:_HASH_SIZE, :_HASH_SIZE]
    bits = (low > np.median(low)).ravel()  # row-major, the first bit the most significant
    unsigned = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return unsigned - (1 << _BITS) if unsigned >> (_BITS - 1) else unsigned


def _reducible(pixels: np.ndarray, factor: int) -> bool:
    height, width = pixels.shape[:2]
    return (
        pixels.dtype == np.uint8
        and pixels.ndim == 3
        and pixels.shape[2] == 3
        and height % factor == 0
        and width % factor == 0
    )


def _reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Pillow's `Image.fromarray(pixels).reduce(factor)` of RGB pixels whose sides are
    multiples of `factor`: block sums, then Pillow's fixed-point rounding of the mean,
    `((sum + n // 2) * m) >> 24` with `m = (float) 2^32 / (256 n)` (n pixels per block,
    `division_UINT32` in Pillow's Reduce.c)."""
    count = factor * factor
    wide = np.uint16 if count * 255 < 1 << 16 else np.uint32
    rows = np.add(pixels[0::factor], pixels[1::factor], dtype=wide)
    for offset in range(2, factor):
        rows += pixels[offset::factor]
    # sums over blocks of `factor` columns: differences of running sums along each row, at the
    # end of each block (several times faster than adding strided columns)
    ends = np.cumsum(rows, axis=1, dtype=np.uint32)[:, factor - 1 :: factor]
    sums = np.diff(ends, axis=1, prepend=np.zeros((len(ends), 1, 3), np.uint32))
    multiplier = int(np.float32(2.0**32) / np.float32(256 * count))
    sums += count // 2
    sums *= multiplier  # below 2^32, as in Pillow's UINT32 arithmetic
    return (sums >> 24).astype(np.uint8)
