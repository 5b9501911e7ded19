"""Perceptual hashes of real tissue: imagehash's pHash as a signed 64-bit integer."""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import polars as pl
from PIL import Image

from cpia_assets.core import perceptual
from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS, hamming, phash, phash_file
from cpia_assets_tests.support.slide_factory import tissue_only, tissue_tiles


def _imagehash(pixels: np.ndarray) -> int:
    """imagehash's pHash as an unsigned integer, first coefficient in the top bit."""
    return int(str(imagehash.phash(Image.fromarray(pixels))), 16)


def test_phash_is_imagehash_as_a_signed_64_bit_integer() -> None:
    tile = tissue_tiles()[0]
    value = phash(tile)
    assert value % (1 << 64) == _imagehash(tile)  # the same bits, two's complement
    assert value < 0  # the first coefficient (the mean) is above the median: the top bit
    assert phash(Image.fromarray(tile)) == value
    assert pl.Series([value, None], dtype=pl.Int64).to_list() == [value, None]
    assert hamming(value, value) == 0
    assert hamming(value, ~value) == 64  # every bit flipped
    assert hamming(value, value ^ 0b1011) == 3


def test_phash_file_of_a_lossless_file_is_the_hash_of_its_pixels(tmp_path: Path) -> None:
    tile = tissue_tiles()[1]
    Image.fromarray(tile).save(tmp_path / "tile.png")
    assert phash_file(tmp_path / "tile.png") == phash(tile)


def test_large_tiles_are_reduced_first_and_hash_within_the_near_duplicate_bits() -> None:
    """An XL tile is box-reduced before imagehash's Lanczos: its hash barely moves."""
    xl = np.ascontiguousarray(tissue_only(3840, 3840).numpy())
    assert hamming(phash(xl), _imagehash(xl)) <= NEAR_DUPLICATE_BITS
    assert phash(xl[:511, :511]) % (1 << 64) == _imagehash(xl[:511, :511])  # not reduced


def _reduced_imagehash(pixels: np.ndarray) -> int:
    """The reference: Pillow's reduce (as `phash` decides it), then imagehash, signed."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    factor = min(image.size) // 256
    if factor > 1:
        image = image.reduce(factor)
    unsigned = int(str(imagehash.phash(image)), 16)
    return unsigned - (1 << 64) if unsigned >> 63 else unsigned


def test_the_numpy_reduce_is_pillows_reduce_bit_for_bit() -> None:
    """`_reduce` replaces Pillow's reduce for large tiles: the same fixed-point rounding, on
    random pixels and on the extremes (all 0, all 255) for every factor a tile can need."""
    rng = np.random.default_rng(0)
    for factor in range(2, 18):
        pixels = rng.integers(0, 256, (factor * 7, factor * 5, 3), dtype=np.uint8)
        pixels[:factor, :factor], pixels[factor : 2 * factor, :factor] = 255, 0
        expected = np.asarray(Image.fromarray(pixels).reduce(factor))
        assert np.array_equal(perceptual._reduce(pixels, factor), expected), factor


def test_tiles_cut_from_a_strip_hash_as_pillow_and_imagehash_do() -> None:
    """XL, L, M and S tiles as the tiler passes them (views into a wider strip, not
    contiguous): the fast path gives imagehash's bits exactly, not merely near them."""
    xl = np.ascontiguousarray(tissue_only(3840, 3840).numpy())
    strip = np.concatenate([xl[:, ::-1], xl], axis=1)
    view = strip[:, 3840:]
    tiles = [view, view[960:1920, 1920:2880], view[:384, 384:768], view[96:192, :96]]
    for tile in tiles:
        assert phash(tile) == _reduced_imagehash(tile), tile.shape
    assert phash(view[:3000, :3000]) == _reduced_imagehash(view[:3000, :3000])  # Pillow's path
