"""`near_duplicates`: planted duplicates of real tissue tiles are found and distinct tissue is
not; the pigeonhole block join finds exactly what comparing every pair finds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.core.manifest.leaks import near_duplicates
from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS, phash, phash_file
from cpia_assets_tests.support.manifest_data import DataFolder
from cpia_assets_tests.support.slide_factory import tissue_tiles


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer)


def test_a_reencoded_or_resized_tile_is_found_and_distinct_tissue_is_not(tmp_path: Path) -> None:
    """Candidates: 70 real tissue tiles saved as q75 JPEGs; queries: three of them re-encoded
    at q50 and q95 and resized to 224 px, and the 8 held-out tiles (distinct tissue)."""
    tiles = tissue_tiles()
    paths = []
    for index, tile in enumerate(tiles[:70]):
        paths.append(tmp_path / f"tile-{index}.jpg")
        Image.fromarray(tile).save(paths[-1], quality=75)
    candidates = pl.DataFrame({"path": [str(p) for p in paths],
                               "phash": [phash_file(p) for p in paths]})  # fmt: skip
    candidates.write_parquet(tmp_path / "candidates.parquet")
    queries, expected = [], []
    for index in (0, 33, 69):
        with Image.open(paths[index]) as saved:
            for variant in (_jpeg(saved, 50), _jpeg(saved, 95), saved.resize((224, 224))):
                queries.append({"id": f"planted-{index}", "phash": phash(variant.convert("RGB"))})
                expected.append((1, str(paths[index])))
    for index, tile in enumerate(tiles[70:]):
        queries.append({"id": f"held-out-{index}", "phash": phash(tile)})
        expected.append((0, None))
    queries.append({"id": "no hash", "phash": None})
    expected.append((None, None))
    query_frame = pl.DataFrame(queries, schema={"id": pl.String, "phash": pl.Int64})
    for source in (candidates, tmp_path / "candidates.parquet", str(tmp_path / "*.parquet")):
        found = near_duplicates(query_frame, source)
        assert found.columns == ["id", "phash", "near_duplicates", "example"]
        assert found["id"].to_list() == query_frame["id"].to_list()  # the queries' order
        assert list(found.select("near_duplicates", "example").iter_rows()) == expected


@pytest.mark.parametrize("max_distance", [0, 3, NEAR_DUPLICATE_BITS])
def test_the_block_join_finds_what_comparing_every_pair_finds(max_distance: int) -> None:
    """Random hashes, with queries planted at every distance 0..max_distance + 2 from a
    candidate (twice each), plus duplicate candidates and null hashes on both sides."""
    rng = np.random.default_rng(max_distance)
    bits = np.uint64(1) << np.arange(64, dtype=np.uint64)
    candidates = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
    candidates[1::500] = candidates[::500]  # equal hashes, different paths
    planted = []
    for distance in [*range(max_distance + 3)] * 2:
        flip = np.bitwise_or.reduce(rng.choice(bits, distance, replace=False), initial=0)
        source = candidates[rng.integers(len(candidates))].view(np.uint64)
        planted.append((source ^ np.uint64(flip)).view(np.int64))
    hashes = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 300, dtype=np.int64), planted])
    query_frame = pl.DataFrame({"phash": [*hashes.tolist(), None]}, schema={"phash": pl.Int64})
    paths = [f"c{index:04d}.jpg" for index in range(len(candidates))]
    candidate_frame = pl.DataFrame(
        {"path": [*paths, "null.jpg"], "phash": [*candidates.tolist(), None]},
        schema={"path": pl.String, "phash": pl.Int64},
    )
    found = near_duplicates(query_frame, candidate_frame, max_distance=max_distance)

    xor = hashes.view(np.uint64)[:, None] ^ candidates.view(np.uint64)[None, :]
    close = np.bitwise_count(xor) <= max_distance
    example = [min((paths[j] for j in np.flatnonzero(row)), default=None) for row in close]
    assert found["near_duplicates"].to_list() == [*close.sum(axis=1).tolist(), None]
    assert found["example"].to_list() == [*example, None]
    assert close[len(hashes) - len(planted) :].any(axis=1).sum() >= 2 * (max_distance + 1)


def test_an_audit_of_the_manifest_finds_the_images_mini_holds(loaded: DataFolder) -> None:
    """Queries from the manifest, candidates from every partition's Mini records: the ROI
    set's train images are in Mini (linked), its val/test images have no near-duplicate."""
    layout = loaded.layout
    with open_manifest(layout) as con:
        images = con.sql(
            "SELECT image_name, split, path, phash FROM tiles WHERE subdataset = 'roi-blood' "
            "ORDER BY image_name"
        ).pl()
    found = near_duplicates(images, layout.root / "manifests" / "*" / "mini_images.parquet")
    for row in found.iter_rows(named=True):
        if row["split"] == "train":
            assert row["near_duplicates"] == 1
            assert row["example"] == row["path"].replace("cpia/", "cpia-mini/", 1)
        else:
            assert (row["near_duplicates"], row["example"]) == (0, None), row["image_name"]
