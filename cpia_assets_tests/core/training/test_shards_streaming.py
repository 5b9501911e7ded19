"""The export streams: the records are read, the selection is kept and the shards are written
a bounded number of rows at a time, and the result does not depend on that bound (a batch of a
few rows gives the same shards, index, fingerprint and samples file as one batch of all)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from PIL import Image

from cpia_assets.core import schema
from cpia_assets.core.catalog.model import Catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.schema import MiniReason
from cpia_assets.core.training import shards
from cpia_assets.core.training.exclusions import Exclusions, ExclusionSettings
from cpia_assets.core.training.shards import (
    INDEX_FILE,
    SAMPLES_FILE,
    Selection,
    ShardSettings,
    export_shards,
    variant_sidecars,
)
from cpia_assets_tests.support.manifest_data import entry

IMAGES = 3
"""Real JPEG files; many records share them (the export reads bytes, it never copies files)."""


def _folder(root: Path, per_set: int = 40, *, twice: bool = True) -> tuple[DataLayout, Catalog]:
    """Two partitions of S records: `roi-cells` (labelled: a tenth val, a tenth test) and
    `wsi-skin`; records point at a few shared JPEG files. `roi-cells` lists one val image a
    second time, as train, in a later row: held out all the same (one identity)."""
    layout = DataLayout(root)
    files = []
    for index in range(IMAGES):
        path = layout.cpia_dir / "S" / "shared" / f"img-{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (index * 60, 90, 30)).save(path, quality=90)
        os.utime(path, ns=(10**18, 10**18))  # the fingerprint holds each file's mtime
        files.append(layout.relative(path))
    catalog = Catalog(
        path=root / "catalog.yaml",
        subdatasets=(
            entry("roi-cells", "roi", "blood", scale="S", labelled=True),
            entry("wsi-skin", "wsi", "skin"),
            entry("wsi-unbuilt", "wsi", "lung"),
        ),
    )
    for key in ("roi-cells", "wsi-skin"):
        rows = [
            {"image_name": f"{key}.{i:03d}", "subdataset": key, "scale": "S", "kind": "roi",
             "path": files[i % IMAGES], "phash": i * 7, "label": f"c{i % 3}",
             "source_file": f"raw/{key}/{'held' if i % 13 == 0 else 'kept'}/{i}.png",
             "split": ("val", "test", *["train"] * 8)[i % 10] if key == "roi-cells" else "none"}
            for i in range(per_set)
        ]  # fmt: skip
        if twice:
            rows.append(rows[0] | {"split": "train"})  # the same identity again, later
        rows.append(rows[2] | {"image_name": f"{key}.rejected", "path": None})
        path = layout.manifest_file(key, "tiles")
        path.parent.mkdir(parents=True, exist_ok=True)
        schema.frame(rows, schema.TILES).write_parquet(path, row_group_size=7)
    return layout, catalog


EXCLUSIONS = ExclusionSettings(rules=("wsi-skin:held/*", "wsi-*:no-such-name"))


def _export(root: Path, batch_rows: int | None) -> dict[str, Any]:
    layout, catalog = _folder(root)
    images = variant_sidecars(
        layout, catalog, "cpia-s", Exclusions.load(EXCLUSIONS), batch_rows=batch_rows
    )
    settings = ShardSettings(shard_size=9, exclusions=EXCLUSIONS)
    result = export_shards(images.sidecars, variant="cpia-s", layout=layout, settings=settings,
                           held_out=images.held_out)  # fmt: skip
    assert result.written and not result.failures
    folder = layout.shards_dir("cpia-s")
    return {
        "images": len(images.sidecars),
        "held_out": images.held_out,
        "missing": images.missing,
        "unmatched": [line.split(": ", 1)[1] for line in images.unmatched_rules],
        "index": (folder / INDEX_FILE).read_text(),
        "tars": {path.name: path.read_bytes() for path in sorted(folder.glob("*.tar"))},
        "samples": pl.read_parquet(folder / SAMPLES_FILE),
    }


def test_a_few_rows_at_a_time_give_the_export_of_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[int] = []
    batches = shards.record_batches

    def counted(*args: Any) -> Any:
        for rows in batches(*args):
            read.append(len(rows))
            yield rows

    monkeypatch.setattr(shards, "record_batches", counted)
    whole = _export(tmp_path / "one-batch", batch_rows=None)
    assert max(read) > 5  # one batch per row group (7 rows) of each file
    read.clear()
    streamed = _export(tmp_path / "three-rows", batch_rows=3)
    assert read and max(read) <= 3
    assert streamed["tars"] == whole["tars"] and streamed["index"] == whole["index"]
    assert streamed["samples"].equals(whole["samples"])
    assert streamed == whole | {"samples": streamed["samples"]}
    # 2 x 40 kept records: roi-cells loses its 4 val and 4 test images (its duplicate row
    # included), wsi-skin its 4 names matching the rule; the rejected rows have no file.
    assert whole["images"] == 80 - 8 - 4
    assert whole["held_out"] == Counter({MiniReason.EVAL_SPLIT: 8, MiniReason.EXCLUDED: 4})
    assert whole["missing"] == ["wsi-unbuilt"]
    assert whole["unmatched"] == ["exclusion rule 'wsi-*:no-such-name' matched no image of "
                                  "the built partitions wsi-skin"]  # fmt: skip
    assert whole["samples"]["key"].to_list() == sorted(whole["samples"]["key"])
    assert len(whole["tars"]) == -(-whole["images"] // 9)


def test_the_selection_and_the_shards_are_handled_a_bounded_number_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows fetched from the selection come `batch_rows` at a time, and no more than
    `_SHARDS_IN_FLIGHT` shards' samples are handed over at once, whatever the sample count."""
    layout, catalog = _folder(tmp_path, per_set=200, twice=False)
    fetched: list[int] = []
    handed: list[int] = []
    fetch, run = Selection.batches, shards.map_unordered

    def counted_fetch(self: Selection, *args: Any) -> Any:
        for batch in fetch(self, *args):
            fetched.append(len(batch))
            yield batch

    def counted_run(function: Any, items: Any, executor: Any) -> Any:
        items = list(items)
        handed.append(len(items))
        return run(function, items, executor)

    monkeypatch.setattr(Selection, "batches", counted_fetch)
    monkeypatch.setattr(shards, "map_unordered", counted_run)
    monkeypatch.setattr(shards, "_SHARDS_IN_FLIGHT", 2)
    images = variant_sidecars(layout, catalog, "cpia-s", None, batch_rows=5)
    assert len(images.sidecars) == 400
    sidecars = list(images.sidecars)  # key order, through the same bounded fetch
    assert [s["image_name"] for s in sidecars][:2] == ["roi-cells.000", "roi-cells.001"]
    fetched.clear()

    class Pool:  # an executor: shards are handed over `_SHARDS_IN_FLIGHT` at a time
        def submit(self, function: Any, item: Any) -> Any:
            from concurrent.futures import Future

            future: Future[Any] = Future()
            future.set_result(function(item))
            return future

    result = export_shards(images.sidecars, variant="cpia-s", layout=layout,
                           settings=ShardSettings(shard_size=7), executor=Pool())  # fmt: skip
    assert result.written and result.index["images"] == 400
    assert fetched and max(fetched) <= 5
    assert max(handed) <= 2 and sum(handed) == len(result.index["shards"]) == -(-400 // 7)


def test_the_selection_leaves_nothing_behind(tmp_path: Path) -> None:
    layout, catalog = _folder(tmp_path, twice=False)
    images = variant_sidecars(layout, catalog, "cpia-s", None)
    folder = images.sidecars.folder
    assert folder.is_dir() and folder.parent == layout.shards_dir("cpia-s").parent
    del images
    assert not folder.exists()
    export_shards([], variant="cpia-s", layout=layout, settings=ShardSettings())
    assert [path.name for path in layout.shards_dir("cpia-s").parent.iterdir()] == ["cpia-s"]
