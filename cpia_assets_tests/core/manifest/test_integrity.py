from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cpia_assets.core import schema
from cpia_assets.core.fsutil import write_parquet_atomic
from cpia_assets.core.manifest import integrity
from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets_tests.support.manifest_data import DataFolder, build_data_folder


@pytest.fixture
def loaded(tmp_path: Path) -> DataFolder:
    data = build_data_folder(tmp_path / "data")
    load_manifest(data.layout, data.catalog)
    return data


def file_checks(data: DataFolder) -> tuple[integrity.CheckOutcome, integrity.CheckOutcome]:
    with open_manifest(data.layout) as con:
        comparison = integrity.compare_files(con, data.layout)
    return integrity.rows_have_files(comparison), integrity.no_orphan_files(comparison)


def add_tile_rows(data: DataFolder, key: str, rows: list[Mapping[str, Any]]) -> None:
    """Append rows (copies of an existing row with some fields changed) and reload."""
    path = data.layout.manifest_file(key, "tiles")
    tiles = pl.read_parquet(path)
    template = tiles.row(0, named=True)
    extra = pl.DataFrame([{**template, **row} for row in rows], schema=tiles.schema)
    write_parquet_atomic(pl.concat([tiles, extra]), path)
    load_manifest(data.layout, data.catalog)


def test_a_consistent_manifest_passes_every_check(loaded: DataFolder) -> None:
    rows, orphans = file_checks(loaded)
    assert rows.passed and rows.details["rows"] == 22 + 2  # and the two Mini images
    assert orphans.passed and orphans.details["files"] == 22 + 2
    with open_manifest(loaded.layout) as con:
        ratios = integrity.ratios_within_spec(con)
        names = integrity.unique_names_per_folder(con)
    assert ratios.passed, ratios.details
    assert ratios.details["xl_tiles"] == 3 and ratios.details["ratio_XL_L_M_S"] == "1:2.0:2.0:1.0"
    assert names.passed


def test_a_deleted_or_resized_file_fails_the_rows_check(loaded: DataFolder) -> None:
    root = loaded.layout.root
    (root / "cpia/M/wsi-breast/BRS-0001-384-1-0.jpg").unlink()
    resized = root / "cpia/S/roi-blood/cell_1.jpg"
    recorded = resized.stat().st_size
    resized.write_bytes(resized.read_bytes() + b"\0" * 10)
    rows, orphans = file_checks(loaded)
    assert not rows.passed
    assert rows.details["missing_examples"] == ["cpia/M/wsi-breast/BRS-0001-384-1-0.jpg"]
    # the Mini image is a hard link of the resized file: it changed too
    assert rows.details["wrong_size_examples"] == [
        {"path": f"{top}/S/roi-blood/cell_1.jpg", "recorded": recorded, "actual": recorded + 10}
        for top in ("cpia", "cpia-mini")
    ]
    assert "1 files missing, 2 of another size" in rows.summary
    assert orphans.passed


def test_an_orphan_file_fails_the_orphan_check(loaded: DataFolder) -> None:
    root = loaded.layout.root
    for orphan in ("cpia/M/wsi-breast/stray.jpg", "cpia/L/loose.jpg", "cpia/S/old-key/a.jpg"):
        (root / orphan).parent.mkdir(parents=True, exist_ok=True)
        (root / orphan).write_bytes(b"jpeg")
    in_flight = root / "cpia/M/wsi-colon/.x.jpg.tmp/x.jpg"  # an atomic write not yet renamed
    in_flight.parent.mkdir()
    in_flight.write_bytes(b"jpeg")
    rows, orphans = file_checks(loaded)
    assert rows.passed
    assert not orphans.passed and orphans.details["orphans"] == 3
    assert sorted(orphans.details["orphan_examples"]) == [
        "cpia/L/loose.jpg", "cpia/M/wsi-breast/stray.jpg", "cpia/S/old-key/a.jpg",
    ]  # fmt: skip


def test_tiles_outside_or_without_their_parent_fail_the_ratio_check(loaded: DataFolder) -> None:
    add_tile_rows(loaded, "wsi-colon", [
        # parent XL (0, 1) spans M cells x 0-9, y 10-19: (12, 10) lies outside it
        {"image_name": "COL-0001-384-12-10", "scale": "M", "x": 12, "y": 10,
         "parent_image": "COL-0001-3840-0-1"},
        # ... and (5, 20) lies below it: right column, wrong row
        {"image_name": "COL-0001-384-5-20", "scale": "M", "x": 5, "y": 20,
         "parent_image": "COL-0001-3840-0-1"},
        {"image_name": "COL-0001-960-0-40", "scale": "L", "x": 0, "y": 40,
         "parent_image": "COL-0001-3840-0-10"},
    ])  # fmt: skip
    with open_manifest(loaded.layout) as con:
        outcome = integrity.ratios_within_spec(con)
    assert not outcome.passed
    assert outcome.details["broken_links"] == 3 and outcome.details["crowded_xl_tiles"] == 0
    broken = {e["image"]: e for e in outcome.details["broken_examples"]}
    assert broken["COL-0001-384-12-10"]["outside_parent"] is True
    assert broken["COL-0001-384-5-20"]["outside_parent"] is True
    assert broken["COL-0001-960-0-40"]["parent"] is None


def test_an_xl_tile_with_too_many_children_fails_the_ratio_check(loaded: DataFolder) -> None:
    xl = "COL-0001-3840-0-1"
    # 4x4 L cells of XL (0, 1): x 0-3, y 4-7; two exist, 14 more and a repeat make 17 > 16 ...
    extra_l = [(x, y) for y in range(4, 8) for x in range(4)][2:]
    # ... and 33 M tiles in Mini where 32 are allowed (2 exist).
    extra_m = [(x, y) for y in range(10, 20) for x in range(10)][2:33]
    add_tile_rows(loaded, "wsi-colon", [
        *({"image_name": f"COL-0001-960-{x}-{y}", "scale": "L", "x": x, "y": y,
           "parent_image": xl} for x, y in extra_l),
        *({"image_name": f"COL-0001-960-{x}-{y}", "scale": "L", "x": x, "y": y,
           "parent_image": xl} for x, y in [(0, 4)]),
        *({"image_name": f"COL-0001-384-{x}-{y}", "scale": "M", "x": x, "y": y,
           "parent_image": xl, "in_mini": True} for x, y in extra_m),
    ])  # fmt: skip
    with open_manifest(loaded.layout) as con:
        outcome = integrity.ratios_within_spec(con)
        names = integrity.unique_names_per_folder(con)
    assert not outcome.passed and outcome.details["broken_links"] == 0
    assert outcome.details["crowded_examples"] == [
        {"subdataset": "wsi-colon", "xl_image": xl, "L": 17, "M": 33, "S": 1}
    ]
    # the repeated (0, 4) L tile is also a duplicate name in cpia/L/wsi-colon/
    assert not names.passed
    assert names.details["examples"] == [
        {"folder": "L/wsi-colon", "image": "COL-0001-960-0-4", "copies": 2}
    ]


@pytest.mark.parametrize(("scale", "edge", "allowed"), [("L", 960, 16), ("M", 384, 100)])
def test_one_child_over_the_limit_alone_fails_the_ratio_check(
    loaded: DataFolder, scale: str, edge: int, allowed: int
) -> None:
    """Exactly the limit passes, one more fails (no other check fails on the way)."""
    xl, cells = "COL-0001-3840-0-1", 3840 // edge
    grid = [(x, y) for y in range(cells, 2 * cells) for x in range(cells)]
    with open_manifest(loaded.layout) as con:
        existing = con.execute(
            "SELECT count(*) FROM tiles WHERE parent_image = ? AND scale = ?", [xl, scale]
        ).fetchone()[0]
    names = {f"COL-0001-{edge}-{x}-{y}": (x, y) for x, y in grid}
    with open_manifest(loaded.layout) as con:
        taken = {row[0] for row in con.execute("SELECT image_name FROM tiles").fetchall()}
    free = [(name, xy) for name, xy in names.items() if name not in taken]
    rows = [
        {"image_name": name, "scale": scale, "x": x, "y": y, "parent_image": xl, "in_mini": False}
        for name, (x, y) in free[: allowed - existing]
    ]
    add_tile_rows(loaded, "wsi-colon", rows)
    with open_manifest(loaded.layout) as con:
        assert integrity.ratios_within_spec(con).passed
    extra = {"image_name": f"COL-0001-{edge}-dup", "scale": scale, "x": 0, "y": cells,
             "parent_image": xl, "in_mini": False}  # fmt: skip
    add_tile_rows(loaded, "wsi-colon", [extra])
    with open_manifest(loaded.layout) as con:
        outcome = integrity.ratios_within_spec(con)
    assert not outcome.passed and outcome.details["broken_links"] == 0
    [crowded] = outcome.details["crowded_examples"]
    assert crowded["xl_image"] == xl and crowded[scale] == allowed + 1


def test_the_same_name_in_two_folders_is_not_a_duplicate(loaded: DataFolder) -> None:
    add_tile_rows(loaded, "wsi-breast", [
        {"image_name": "cell_0", "kind": "roi", "scale": "S", "x": None, "y": None,
         "parent_image": None, "path": "cpia/S/wsi-breast/cell_0.jpg"},
    ])  # fmt: skip
    with open_manifest(loaded.layout) as con:
        assert integrity.unique_names_per_folder(con).passed


def test_duplicates_of_several_sub_datasets_are_counted_and_the_most_copied_listed_first(
    loaded: DataFolder,
) -> None:
    """Each sub-dataset is checked on its own; counts add up, examples merge in one order."""
    add_tile_rows(loaded, "wsi-breast", [{"image_name": "twice", "scale": "M"}] * 2)
    add_tile_rows(loaded, "wsi-colon", [{"image_name": "thrice", "scale": "XL"}] * 3)
    roi = {"image_name": "cell_9", "kind": "roi", "scale": "M", "x": None, "y": None,
           "parent_image": None}  # fmt: skip
    add_tile_rows(loaded, "roi-blood", [roi, roi])
    with open_manifest(loaded.layout) as con:
        names = integrity.unique_names_per_folder(con)
    assert not names.passed and names.details["duplicate_names"] == 3
    assert names.details["examples"] == [
        {"folder": "L/wsi-colon", "image": "thrice", "copies": 3},
        {"folder": "M/roi-blood", "image": "cell_9", "copies": 2},
        {"folder": "M/wsi-breast", "image": "twice", "copies": 2},
    ]


def write_mini_of_first_xl(data: DataFolder, key: str, *, s_crops: int, orphan: bool) -> str:
    """cpia_mini's records for the first XL tile of `key`: the XL, its kept L and M tiles and
    `s_crops` S crops of those M tiles; `orphan` adds an L image whose XL is not in Mini."""
    tiles = pl.read_parquet(data.layout.manifest_file(key, "tiles"))
    xl = tiles.filter(pl.col("scale") == "XL").row(0, named=True)["image_name"]
    children = tiles.filter(pl.col("parent_image") == xl).to_dicts()
    m_names = [row["image_name"] for row in children if row["scale"] == "M"]
    rows = [{"image_name": xl, "scale": "XL"}, *children]
    rows += [{"image_name": f"{m}-c", "scale": "S", "parent_image": m} for m in m_names[:s_crops]]
    if orphan:
        rows.append({"image_name": "elsewhere-960-0-0", "scale": "L", "parent_image": "other-xl"})
    rows = [{**row, "subdataset": key, "kind": "wsi", "path": "cpia-mini/x.jpg"} for row in rows]
    write_parquet_atomic(
        schema.frame(rows, schema.MINI_IMAGES), data.layout.manifest_file(key, "mini_images")
    )
    load_manifest(data.layout, data.catalog)
    return xl


def test_mini_ratio_check_requires_every_kept_child_and_one_s_per_m(loaded: DataFolder) -> None:
    write_mini_of_first_xl(loaded, "wsi-breast", s_crops=2, orphan=False)
    with open_manifest(loaded.layout) as con:
        complete = integrity.mini_ratios(con)
    assert complete.passed, complete.details
    assert complete.details["ratio_XL_L_M_S"] == "1:2.0:2.0:2.0"  # XL tiles with 2 kept L, M

    xl = write_mini_of_first_xl(loaded, "wsi-breast", s_crops=1, orphan=True)
    with open_manifest(loaded.layout) as con:
        broken = integrity.mini_ratios(con)
    assert not broken.passed
    assert broken.details["examples"] == [
        {"subdataset": "wsi-breast", "xl_image": xl, "L": 2, "M": 2, "S": 1, "kept_L": 2,
         "kept_M": 2}
    ]  # fmt: skip
    assert broken.details["images_without_xl"] == 1
