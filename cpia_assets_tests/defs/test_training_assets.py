"""cpia_mini and training_shards on real Dagster runs over the small build: reuse decided on
the files on disk, exports that fail naming missing or damaged images, sidecars that carry the
records' fields, and exclusion rules written as people write them, or reported when they match
nothing."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.locks import partition_lock
from cpia_assets.core.training.shards import SIDECAR_FIELDS
from cpia_assets_tests.support.outputs import materialization_of
from cpia_assets_tests.support.processes import LOCK_HOLDER, start_until_ready
from cpia_assets_tests.support.small_catalog import EXCLUDED_SLIDE, MINI_CONFIG


def _run(built: dict[str, Any], asset: str, partition: str, config: dict[str, Any]):
    return built["job"].execute_in_process(
        partition_key=partition,
        asset_selection=[dg.AssetKey(asset)],
        instance=built["instance"],
        run_config={"ops": {asset: {"config": config}}},
        raise_on_error=False,
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    return {name: value.value for name, value in materialization_of(result, asset).metadata.items()}


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    [failed] = [event for event in result.all_events if event.is_step_failure]
    return failed.step_failure_data.error.message.strip()


def _mini_files(layout: DataLayout, key: str) -> list[Path]:
    return sorted(layout.root.glob(f"cpia-mini/*/{key}/*.jpg"))


def test_mini_rebuilds_when_its_images_are_gone(copy_of_small_build) -> None:
    built = copy_of_small_build
    layout = built["layout"]
    before = {path: path.read_bytes() for path in _mini_files(layout, "roi-cells")}
    for path in before:
        path.unlink()
    result = _run(built, "cpia_mini", "roi-cells", MINI_CONFIG)
    assert result.success
    assert not _metadata(result, "cpia_mini")["reused_from_earlier_run"]
    assert {path: path.read_bytes() for path in _mini_files(layout, "roi-cells")} == before
    records = pl.read_parquet(layout.manifest_file("roi-cells", "mini_images"))
    assert sorted(layout.root / path for path in records["path"]) == sorted(before)
    again = _run(built, "cpia_mini", "roi-cells", MINI_CONFIG)
    assert _metadata(again, "cpia_mini")["reused_from_earlier_run"]  # all there: reused


def test_an_export_missing_or_with_damaged_images_fails_naming_them(copy_of_small_build) -> None:
    built = copy_of_small_build
    layout = built["layout"]
    folder = layout.shards_dir("cpia-mini")
    published = {path.name: path.read_bytes() for path in folder.glob("*")}
    missing, garbage = _mini_files(layout, "wsi-40x")[:2]
    missing.unlink()
    garbage.write_bytes(os.urandom(garbage.stat().st_size))  # same size: only the bytes differ
    result = _run(built, "training_shards", "cpia-mini", {"shard_size": 64})
    assert not result.success
    message = _failure_message(result)
    assert "2 of " in message and "missing or damaged, nothing published" in message
    assert layout.relative(missing) in message and layout.relative(garbage) in message
    assert {path.name: path.read_bytes() for path in folder.glob("*")} == published
    for path in _mini_files(layout, "wsi-40x")[2:12]:
        path.unlink()
    message = _failure_message(_run(built, "training_shards", "cpia-mini", {"shard_size": 64}))
    assert "12 of " in message and message.endswith(" and 2 more")  # the first 10, the count
    named = message.split("nothing published: ")[1].removesuffix(" and 2 more").split(", ")
    assert len(named) == 10 and all((layout.root / path).parent.name == "wsi-40x" for path in named)


def test_an_export_of_a_variant_another_build_exports_waits_or_fails_naming_it(
    copy_of_small_build,
) -> None:
    built = copy_of_small_build
    holder = start_until_ready(
        LOCK_HOLDER, str(partition_lock(built["layout"].root, "shards-cpia-mini"))
    )
    try:
        refused = built["job"].execute_in_process(
            partition_key="cpia-mini",
            asset_selection=[dg.AssetKey("training_shards")],
            instance=built["instance"],
            run_config={
                "ops": {"training_shards": {"config": {"shard_size": 64}}},
                "resources": {"partition_locks": {"config": {"when_busy": "fail"}}},
            },
            raise_on_error=False,
        )
        assert not refused.success
        message = _failure_message(refused)
        assert "partition 'shards-cpia-mini': " in message
        assert f"held by run run-A (step hold, process {holder.pid} " in message
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    assert _run(built, "training_shards", "cpia-mini", {"shard_size": 64}).success


def test_shard_sidecars_carry_the_records_fields(small_build) -> None:
    layout, catalog = small_build["layout"], small_build["catalog"]
    records = {
        row["path"]: row
        for key in catalog.keys
        for row in pl.read_parquet(layout.manifest_file(key, "tiles")).iter_rows(named=True)
    }
    checked = 0
    for file in sorted(layout.shards_dir("cpia-s").glob("*.tar")):
        with tarfile.open(file) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    assert tuple(sorted(meta)) == tuple(sorted(SIDECAR_FIELDS))
                    row = records[meta["path"]]
                    for name in ("image_name", "subdataset", "scale", "label", "split", "phash"):
                        assert meta[name] == row[name], (meta["path"], name)
                    checked += meta["label"] is not None
    assert checked > 0  # the labelled cells' labels are among them


TYPO = "wsi-20x:T20-9999*"


@pytest.fixture
def rule_list(tmp_path: Path) -> Path:
    """The held-out slide's rule as people save it: a byte-order mark, a comment line, spaces
    around the ':' and a trailing comment; and a rule that matches nothing (a typo)."""
    path = tmp_path / "evaluation-slides.txt"
    text = f"# slides of the evaluation\r\nwsi-20x : {EXCLUDED_SLIDE}*   # held out\r\n{TYPO}\r\n"
    path.write_text(text, encoding="utf-8-sig")
    return path


def test_a_rule_list_as_people_write_it_applies_and_a_typo_is_reported(
    copy_of_small_build, rule_list: Path
) -> None:
    built = copy_of_small_build
    layout = built["layout"]
    exclusions = {"rules": ["cam16"], "lists": [str(rule_list)]}  # cam16: not in this catalog
    result = _run(built, "cpia_mini", "wsi-20x", MINI_CONFIG | {"exclusions": exclusions})
    assert result.success
    mini = pl.read_parquet(layout.manifest_file("wsi-20x", "mini_images"))
    assert (
        mini.height and not mini.filter(pl.col("source_file").str.contains(EXCLUDED_SLIDE)).height
    )
    expected = [
        f"{rule_list}:3: exclusion rule '{TYPO}' matched no image of the built partitions wsi-20x"
    ]
    assert _metadata(result, "cpia_mini")["exclusion_rules_without_match"] == expected
    shards = _run(built, "training_shards", "cpia-s", {"shard_size": 64, "exclusions": exclusions})
    assert _metadata(shards, "training_shards")["exclusion_rules_without_match"] == expected
    logged = [
        entry.user_message
        for entry in built["instance"].all_logs(shards.run_id)
        if entry.level == 30  # logging.WARNING
    ]
    assert expected[0] in logged
