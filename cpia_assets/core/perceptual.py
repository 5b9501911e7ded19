"""Perceptual hashes: the 64-bit DCT pHash of every written image, for near-duplicate search.

`phash` is `imagehash.phash` (grey, Lanczos to 32 x 32, 2-D DCT-II, the top-left 8 x 8
coefficients against their median), after a box reduce of images of 512 px or more a side to
256-511 px, as Pillow's `reducing_gap` does: beyond an 8x shrink Lanczos is an average anyway,
and the reduce halves a 3840 px tile's hash (110 -> 55 ms; 960 px: 4.6 -> 2.2 ms; 384 px:
1.0 ms; 96 px: 0.25 ms, one core). It moves a tissue tile's hash by at most 4 bits (960-3840
px); images up to 511 px, evaluation images among them, hash exactly as imagehash hashes them.
Hashes are signed 64-bit integers (the two's complement of the 64 bits, first coefficient in
the most significant bit) so that they fit Polars Int64 and DuckDB BIGINT.
"""

from __future__ import annotations

from pathlib import Path

import imagehash
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
_BITS = 64


def phash(image: np.ndarray | Image.Image) -> int:
    """The pHash (module docstring) of an RGB image (H x W x 3 uint8 pixels or a PIL image),
    as a signed 64-bit integer."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    factor = min(image.size) // _REDUCE_TO
    if factor > 1:
        image = image.reduce(factor)
    unsigned = int(str(imagehash.phash(image)), 16)
    return unsigned - (1 << _BITS) if unsigned >> (_BITS - 1) else unsigned


def phash_file(path: Path | str) -> int:
    """`phash` of an image file."""
    with Image.open(path) as image:
        return phash(image.convert("RGB"))


def hamming(a: int, b: int) -> int:
    """Bits in which two hashes differ."""
    return ((a ^ b) & ((1 << _BITS) - 1)).bit_count()
