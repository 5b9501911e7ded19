"""The sample mosaic: a row per sub-dataset, a column per scale."""

from __future__ import annotations

from PIL import Image

from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.core.manifest.mosaic import EMPTY_CELL, UNREADABLE, MosaicStyle, build_mosaic
from cpia_assets_tests.support.manifest_data import DataFolder


def test_mosaic_has_a_row_per_subdataset_and_a_column_per_scale(loaded: DataFolder) -> None:
    layout = loaded.layout
    (layout.root / "cpia/L/wsi-colon/COL-0001-3840-0-1.jpg").write_bytes(b"truncated")
    style = MosaicStyle(samples=2, thumb_px=32, gap_px=4, label_px=100, header_px=20)
    with open_manifest(layout) as con:
        png = build_mosaic(con, layout, layout.root / "mosaic.png", style=style)
    with Image.open(png) as picture:
        image = picture.convert("RGB")
    cell_px = 2 * (32 + 4) + 4
    row_px = 32 + 8
    assert image.size == (100 + 4 * cell_px, 20 + 3 * row_px)

    def pixel(row: int, column: int, slot: int) -> tuple[int, int, int]:
        left = 100 + column * cell_px + 4 + slot * 36 + 16
        return image.getpixel((left, 20 + row * row_px + 4 + 16))  # type: ignore[return-value]

    # rows in Table I organ order: blood (roi-blood), breast (wsi-breast), colon (wsi-colon)
    assert pixel(0, 0, 0) == EMPTY_CELL  # no XL tiles in an ROI sub-dataset
    assert pixel(0, 3, 0) != EMPTY_CELL  # its S images
    assert all(pixel(1, column, 0) not in (EMPTY_CELL, UNREADABLE) for column in range(4))
    assert pixel(2, 0, 0) == UNREADABLE and pixel(2, 0, 1) == EMPTY_CELL  # one XL, broken
