"""CPIA-Mini and its shards: quotas, ratios, exclusions, determinism, real Dagster runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import pytest
import pyvips
import webdataset as wds
from PIL import Image

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.model import Catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS, hamming, phash_file
from cpia_assets.core.schema import MiniReason
from cpia_assets.core.training.exclusions import ExclusionError, Exclusions, ExclusionSettings
from cpia_assets.core.training.mini import MINI_ONLY_SUFFIX, build_mini_partition
from cpia_assets.core.training.mini_sampling import (
    MiniSettings,
    choose_s_cell,
    spread_over_slides,
    xl_quota,
)
from cpia_assets.core.training.shards import ShardSettings, export_shards, sample_key
from cpia_assets.definitions import OBSERVE_JOB, build_definitions
from cpia_assets.demo_run import UP_TO_DATE
from cpia_assets_tests.support.small_catalog import EXCLUDED_SLIDE, mini_run_config

# ---------------------------------------------------------------------------------------------
# Quotas, selection and exclusion rules (no images)


def test_quota_divides_the_organ_budget_among_its_wsi_sets_and_caps_it() -> None:
    catalog = load_catalog("cpia")
    settings = MiniSettings(organ_xl_budget=1600, subdataset_xl_cap=800)
    exclusions = Exclusions.load(settings.exclusions)
    # Table I rows: breast 4 WSI sets; lung 3 (TCGA-LUSC counts under multiple organs: 13);
    # kidney 4, but tcga-kirp (pRCC's source) is excluded
    assert xl_quota(catalog, "tcga-brca", settings, exclusions) == 400
    assert xl_quota(catalog, "cptac-luad", settings, exclusions) == 533
    assert xl_quota(catalog, "tcga-lusc", settings, exclusions) == 129  # (1600 - 41) // 12
    assert xl_quota(catalog, "cmb-lca", settings, exclusions) == 41  # all it has, as published
    assert xl_quota(catalog, "cmb-crc", settings, exclusions) == 257  # alone, under the cap
    assert xl_quota(catalog, "tcga-kirc", settings, exclusions) == 533
    assert xl_quota(catalog, "tcga-kirp", settings, exclusions) == 0
    assert xl_quota(catalog, "tcga-prad", settings, exclusions) == 800  # alone in its row: cap
    assert xl_quota(catalog, "nct-crc-he-100k", settings, exclusions) == 0  # ROI: no XL
    smaller = MiniSettings(organ_xl_budget=1600, subdataset_xl_cap=300)
    assert xl_quota(catalog, "tcga-brca", smaller, exclusions) == 300
    total = sum(xl_quota(catalog, key, settings, exclusions) for key in catalog.keys)
    assert total == 28_242  # README "Quota arithmetic"


def _breast_row(xl: dict[str, int | None]) -> Catalog:
    """The real catalog's breast row (4 WSI sets) with the given published XL counts."""
    real = load_catalog("cpia")
    entries = [
        real.get(key).model_copy(
            update={"published_counts": {} if count is None else {"XL": count}}
        )
        for key, count in xl.items()
    ]
    return Catalog(real.path, tuple(entries))


def test_a_share_one_set_cannot_use_passes_to_its_row_peers() -> None:
    catalog = _breast_row({"tcga-brca": None, "cptac-brca": 1000, "her2-tumor-rois": 100,
                           "post-nat-brca": 450})  # fmt: skip
    settings = MiniSettings(organ_xl_budget=1600, subdataset_xl_cap=800)
    exclusions = Exclusions.load(settings.exclusions)
    quotas = {key: xl_quota(catalog, key, settings, exclusions) for key in catalog.keys}
    # 100 and 450 are all two sets have; the other two share the 1,050 left, unknown = unbounded
    assert quotas == {"tcga-brca": 525, "cptac-brca": 525, "her2-tumor-rois": 100,
                      "post-nat-brca": 450}  # fmt: skip
    larger = MiniSettings(organ_xl_budget=3000, subdataset_xl_cap=800)
    assert [xl_quota(catalog, key, larger, exclusions) for key in catalog.keys] == [
        800, 800, 100, 450,
    ]  # fmt: skip  # capped: the row cannot use its whole budget
    even = _breast_row({"tcga-brca": None, "cptac-brca": 1000, "her2-tumor-rois": 600})
    assert [xl_quota(even, key, settings, exclusions) for key in even.keys] == [533, 533, 533]


def test_xl_tiles_are_spread_over_slides_seeded_and_nested() -> None:
    slides = {
        "big": [f"big-{i}" for i in range(20)],
        "one": ["one-0"],
        "mid": [f"mid-{i}" for i in range(5)],
    }
    picked = spread_over_slides(slides, 7, seed=0)
    per_slide = Counter(name.split("-")[0] for name in picked)
    assert per_slide == {"big": 3, "mid": 3, "one": 1}  # round-robin: no slide dominates
    assert spread_over_slides(slides, 7, seed=0) == picked
    assert spread_over_slides(slides, 12, seed=0)[:7] == picked  # a larger quota adds tiles
    assert spread_over_slides(slides, 7, seed=1) != picked
    assert len(spread_over_slides(slides, 100, seed=0)) == 26


def test_s_crop_is_a_tissue_cell_or_the_richest_one() -> None:
    tissue = np.zeros((4, 4))
    tissue[1, 2], tissue[3, 0] = 0.5, 0.2
    chosen = {choose_s_cell(tissue, 0.1, 0, f"m-{i}") for i in range(40)}
    assert chosen == {(2, 1), (0, 3)}  # (column, row) of the two tissue cells
    blank = np.full((4, 4), 0.01)
    blank[2, 3] = 0.05
    assert choose_s_cell(blank, 0.1, 0, "m") == (3, 2)
    preferred = np.zeros((4, 4), dtype=bool)
    preferred[3, 0] = True
    assert {choose_s_cell(tissue, 0.1, 0, f"m-{i}", preferred=preferred) for i in range(40)} == {
        (0, 3)
    }  # a tissue cell full CPIA keeps wins
    preferred[3, 0], preferred[0, 0] = False, True  # kept, but under the tissue threshold
    assert {choose_s_cell(tissue, 0.1, 0, f"m-{i}", preferred=preferred) for i in range(40)} == {
        (2, 1),
        (0, 3),
    }


def test_exclusion_rules_and_lists(tmp_path: Path) -> None:
    listed = tmp_path / "eval.txt"
    listed.write_text("# pRCC cases\ntcga-kirc:TCGA-AB-12*\n\n")
    exclusions = Exclusions.load(ExclusionSettings(rules=("cam16:*test_*",), lists=(str(listed),)))
    assert exclusions.for_key("cam16")(["testing/test_001.tif"])
    assert not exclusions.for_key("cam16")(["training/normal_001.tif"])
    assert exclusions.for_key("tcga-kirc")(["TCGA-AB-1234-01Z.svs"])
    assert not exclusions.for_key("tcga-brca")(["TCGA-AB-1234-01Z.svs"])
    assert Exclusions.load(ExclusionSettings()).whole("prcc")
    with pytest.raises(ExclusionError, match=r"missing\.txt: cannot read the exclusion list"):
        Exclusions.load(ExclusionSettings(lists=(str(tmp_path / "missing.txt"),)))
    listed.write_text("cam16:\n")
    with pytest.raises(ExclusionError, match=r"eval\.txt:1: exclusion rule 'cam16:'"):
        Exclusions.load(ExclusionSettings(lists=(str(listed),)))


def test_mini_run_config_mirrors_the_settings(tmp_path: Path) -> None:
    defs = build_definitions(load_catalog("demo"), tmp_path)
    job = defs.resolve_job_def("build_subdatasets")
    resolved = dg.validate_run_config(job, mini_run_config())["ops"]["cpia_mini"]["config"]
    assert resolved["exclusions"]["rules"] == [f"wsi-20x:{EXCLUDED_SLIDE}*"]
    assert resolved["m_per_xl"] == 32 and resolved["subdataset_xl_cap"] == 800
    default = dg.validate_run_config(job, {})["ops"]["cpia_mini"]["config"]
    assert default["exclusions"]["rules"] == list(ExclusionSettings().rules)


# ---------------------------------------------------------------------------------------------
# Real runs on the small synthetic catalog (`small_build`, built once per test run)


def _frame(layout: DataLayout, key: str, table: str) -> pl.DataFrame:
    return pl.read_parquet(layout.manifest_file(key, table))


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    [materialization] = result.asset_materializations_for_node(asset)
    return {name: value.value for name, value in materialization.metadata.items()}


def test_wsi_mini_follows_quota_and_ratios(small_build) -> None:
    layout = small_build["layout"]
    for key in ("wsi-40x", "wsi-20x"):
        assert small_build["results"][key].success
        mini = _frame(layout, key, "mini_images")
        tiles = _frame(layout, key, "tiles")
        xl = mini.filter(pl.col("scale") == "XL")["image_name"].to_list()
        assert 1 <= len(xl) <= 2  # quota: budget 2 for the organ's only WSI set
        for name in xl:
            kept = tiles.filter(pl.col("parent_image") == name)
            children = mini.filter(pl.col("parent_image") == name)
            count = dict(children.group_by("scale").len().iter_rows())
            assert count["L"] == kept.filter(pl.col("scale") == "L").height <= 16
            assert count["M"] == min(32, kept.filter(pl.col("scale") == "M").height)
            m_names = children.filter(pl.col("scale") == "M")["image_name"]
            s_crops = mini.filter((pl.col("scale") == "S") & pl.col("parent_image").is_in(m_names))
            assert s_crops.height == count["M"]  # one S crop per Mini M tile
            _assert_s_crops_name_whether_full_cpia_keeps_them(s_crops, tiles)
        metadata = _metadata(small_build["results"][key], "cpia_mini")
        assert metadata["quota_used"] == len(xl) and metadata["xl_quota"] == 2
        assert metadata["preview"].startswith("![Mini samples](data:image/jpeg;base64,")
        for row in mini.iter_rows(named=True):
            with Image.open(layout.root / row["path"]) as image:
                assert image.size == (384, 384), row["path"]
            assert row["path"].startswith(
                f"cpia-mini/{'L' if row['scale'] == 'XL' else row['scale']}/"
            )


def _assert_s_crops_name_whether_full_cpia_keeps_them(
    s_crops: pl.DataFrame, tiles: pl.DataFrame
) -> None:
    kept_s = tiles.filter((pl.col("scale") == "S") & pl.col("path").is_not_null())
    kept_names, s_parents = set(kept_s["image_name"]), set(kept_s["parent_image"])
    for crop in s_crops.iter_rows(named=True):
        name = crop["image_name"]
        if name.endswith(MINI_ONLY_SUFFIX):
            assert name.removesuffix(MINI_ONLY_SUFFIX) not in kept_names
            assert crop["source_tile"] == crop["parent_image"]
        else:
            assert name in kept_names and crop["source_tile"] == name
    # the 40x slide's M tiles are all tissue: a cell full CPIA keeps is preferred when there is one
    crops_under_kept_s = s_crops.filter(pl.col("parent_image").is_in(list(s_parents)))
    assert crops_under_kept_s.height
    assert not crops_under_kept_s["image_name"].str.ends_with(MINI_ONLY_SUFFIX).any()


def test_mini_s_crop_is_the_recorded_cell_of_the_standardized_slide_enlarged(small_build) -> None:
    """The S crop's pixels come from the standardized slide (one JPEG generation, as the
    full-CPIA tiles), not from the decoded M JPEG: re-made from the slide, the bytes match."""
    layout = small_build["layout"]
    mini = _frame(layout, "wsi-40x", "mini_images")
    tiles = _frame(layout, "wsi-40x", "tiles")
    slide_of = dict(zip(tiles["image_name"], tiles["standardized_file"], strict=True))
    crops = mini.filter(pl.col("scale") == "S")
    assert crops.height
    for crop in crops.head(8).iter_rows(named=True):
        slide = pyvips.Image.new_from_file(str(layout.root / slide_of[crop["parent_image"]]))
        cell = slide.crop(crop["x"] * 96, crop["y"] * 96, 96, 96)
        remade = cell.resize(4, kernel="lanczos3").jpegsave_buffer(Q=90, keep="none")
        assert (layout.root / crop["path"]).read_bytes() == remade, crop["path"]
        assert (
            crop["image_name"]
            .removesuffix(MINI_ONLY_SUFFIX)
            .endswith(f"-96-{crop['x']}-{crop['y']}")
        )


def test_mini_images_hold_the_hash_of_their_pixels_and_the_manifest_too(small_build) -> None:
    """Linked images (M tiles, ROI images) keep their source tile's hash; shrunk XL and L
    images and enlarged S crops hash the pixels they were encoded from, near their JPEG's."""
    from cpia_assets.core.manifest.database import open_manifest

    layout = small_build["layout"]
    with open_manifest(layout) as con:
        for key in small_build["catalog"].keys:
            mini = _frame(layout, key, "mini_images")
            tiles = _frame(layout, key, "tiles")
            source_hash = dict(zip(tiles["path"], tiles["phash"], strict=True))
            assert mini.height and mini["phash"].null_count() == 0
            for row in mini.iter_rows(named=True):
                if row["resample"] == "none":
                    assert row["phash"] == source_hash[row["source_path"]], row["path"]
                written = phash_file(layout.root / row["path"])
                assert hamming(row["phash"], written) <= NEAR_DUPLICATE_BITS, row["path"]
            for table, frame in (("tiles", tiles), ("mini_images", mini)):
                loaded = con.sql(
                    f"SELECT path, phash FROM {table} WHERE subdataset = ? ORDER BY path",
                    params=[key],
                ).pl()
                assert loaded.equals(frame.select("path", "phash").sort("path")), (key, table)


def test_excluded_slide_never_enters_mini(small_build) -> None:
    layout = small_build["layout"]
    mini = _frame(layout, "wsi-20x", "mini_images")
    assert (
        mini.height and not mini.filter(pl.col("source_file").str.contains(EXCLUDED_SLIDE)).height
    )
    assert not any(EXCLUDED_SLIDE in path.name for path in layout.root.glob("cpia-mini/*/*/*"))
    selection = _frame(layout, "wsi-20x", "mini_selection")
    tiles = _frame(layout, "wsi-20x", "tiles")
    excluded = tiles.filter(pl.col("source_file").str.contains(EXCLUDED_SLIDE))["image_name"]
    reasons = selection.filter(pl.col("image_name").is_in(excluded))["mini_reason"].unique()
    assert excluded.len() and reasons.to_list() == [MiniReason.EXCLUDED]


def test_labelled_roi_sets_give_only_their_training_split(small_build) -> None:
    layout = small_build["layout"]
    for key in ("roi-cells", "roi-tissue"):
        mini = _frame(layout, key, "mini_images")
        tiles = _frame(layout, key, "tiles")
        train = tiles.filter(pl.col("split") == "train")
        assert sorted(mini["image_name"]) == sorted(train["image_name"])
        for row in mini.iter_rows(named=True):  # linked, never re-encoded
            source = (
                layout.root / tiles.filter(pl.col("image_name") == row["image_name"])["path"][0]
            )
            assert (layout.root / row["path"]).read_bytes() == source.read_bytes()
        selection = _frame(layout, key, "mini_selection")
        held_out = selection.filter(~pl.col("in_mini"))
        assert held_out["mini_reason"].unique().to_list() == [MiniReason.EVAL_SPLIT]
        assert held_out.height == tiles.height - train.height


def test_manifest_marks_in_mini_and_its_checks_pass(small_build) -> None:
    from cpia_assets.core.manifest.database import open_manifest
    from cpia_assets.core.manifest.queries import table_i

    result = small_build["manifest"]
    checks = {
        event.event_specific_data.check_name: event.event_specific_data.passed
        for event in result.all_events
        if event.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert checks["mini_ratios"] and all(checks.values()), checks
    with open_manifest(small_build["layout"]) as con:
        reasons = dict(con.sql("SELECT mini_reason, count(*) FROM tiles GROUP BY ALL").fetchall())
        mini_total = table_i(con, mini_only=True).filter(pl.col("organ") == "Total")["total"]
        [(mini_rows,)] = con.sql("SELECT count(*) FROM mini_images").fetchall()
        [(blank,)] = con.sql(
            "SELECT count(*) FROM rejected_tiles WHERE mini_reason <> 'blank'"
        ).fetchall()
    assert set(reasons) == {"selected", "not selected", "val/test split", "excluded for evaluation"}
    assert mini_total.item() == mini_rows > 0 and blank == 0


def test_rebuild_writes_the_same_bytes_and_a_rerun_reuses(small_build) -> None:
    layout, catalog = small_build["layout"], small_build["catalog"]
    key = "wsi-20x"
    before = {p: p.read_bytes() for p in layout.root.glob(f"cpia-mini/*/{key}/*.jpg")}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    settings = MiniSettings(organ_xl_budget=2, exclusions=ExclusionSettings(
        rules=(f"wsi-20x:{EXCLUDED_SLIDE}*",)))  # fmt: skip
    exclusions = Exclusions.load(settings.exclusions)
    tiles = _frame(layout, key, "tiles").to_dicts()
    common = {"quota": xl_quota(catalog, key, settings, exclusions), "exclusions": exclusions,
              "layout": layout, "settings": settings}  # fmt: skip
    reused = build_mini_partition(catalog.get(key), tiles, **common)
    assert reused.reused == 1
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes  # nothing rewritten
    (layout.manifest_dir(key) / "parts" / "mini" / "mini.json").unlink()
    rebuilt = build_mini_partition(catalog.get(key), tiles, **common)
    after = {p: p.read_bytes() for p in layout.root.glob(f"cpia-mini/*/{key}/*.jpg")}
    assert rebuilt.reused == 0 and len(after) == len(before) > 0
    assert after == before
    assert rebuilt.records == reused.records


# ---------------------------------------------------------------------------------------------
# Shards


def _folder_copy(layout: DataLayout, sidecar: dict[str, Any]) -> bytes:
    return (layout.root / sidecar["path"]).read_bytes()


def test_shards_round_trip_through_webdataset_and_tarfile(small_build) -> None:
    layout = small_build["layout"]
    assert small_build["shards"]["cpia-mini"].success
    folder = layout.shards_dir("cpia-mini")
    index = json.loads((folder / "index.json").read_text())
    mini = pl.concat(
        [_frame(layout, key, "mini_images") for key in small_build["catalog"].keys], how="vertical"
    )
    assert index["images"] == mini.height and index["shard_size"] == 64
    assert index["per_scale"] == {s: mini.filter(pl.col("scale") == s).height for s in
                                  ("XL", "L", "M", "S")}  # fmt: skip
    assert sum(index["per_folder"].values()) == index["images"]
    files = [folder / shard["file"] for shard in index["shards"]]
    assert [f.name for f in files] == [f"shard-{i:06d}.tar" for i in range(len(files))]
    assert [shard["images"] for shard in index["shards"][:-1]] == [64] * (len(files) - 1)

    seen = {}
    for file in files:
        with tarfile.open(file) as tar:
            members = tar.getmembers()
            assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
            for image, sidecar in zip(members[::2], members[1::2], strict=True):
                key = image.name.removesuffix(".jpg")
                assert sidecar.name == f"{key}.json" and "." not in key
                meta = json.loads(tar.extractfile(sidecar).read())
                assert tar.extractfile(image).read() == _folder_copy(layout, meta)
                seen[key] = meta
    assert len(seen) == mini.height
    row = mini.filter(pl.col("scale") == "S").row(0, named=True)
    meta = seen[sample_key(row["subdataset"], "S", row["image_name"])]
    assert meta["source_tile"] == row["source_tile"] and meta["folder"] == "S"
    assert meta["organ"] in {"breast", "colon"} and meta["split"] == "none"

    first_shard = [meta["subdataset"] for meta in list(seen.values())[:64]]
    assert len(set(first_shard)) > 1  # shuffled across sub-datasets
    dataset = wds.WebDataset([str(f) for f in files], shardshuffle=False, empty_check=False)
    read_back = 0
    for sample in dataset:
        meta = json.loads(sample["json"])
        assert sample["jpg"] == _folder_copy(layout, meta)
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.size == (384, 384)
        read_back += 1
    assert read_back == mini.height


def test_scale_subset_holds_only_its_folder(small_build) -> None:
    layout = small_build["layout"]
    index = json.loads((layout.shards_dir("cpia-s") / "index.json").read_text())
    assert index["per_folder"] == {"L": 0, "M": 0, "S": index["images"]} and index["images"] > 0


def test_reexport_of_unchanged_inputs_writes_nothing_and_is_byte_identical(small_build) -> None:
    layout, job = small_build["layout"], small_build["job"]
    folder = layout.shards_dir("cpia-s")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.glob("*.tar")}
    again = job.execute_in_process(
        partition_key="cpia-s",
        asset_selection=[dg.AssetKey("training_shards")],
        instance=small_build["instance"],
        run_config={"ops": {"training_shards": {"config": {"shard_size": 64}}}},
    )
    assert _metadata(again, "training_shards")["written"] is False
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.glob("*.tar")} == before
    index = (folder / "index.json").read_text()
    (folder / ".fingerprint").unlink()
    sidecars = [json.loads(m) for m in _sidecars(folder)]
    result = export_shards(sidecars, variant="cpia-s", layout=layout,
                           settings=ShardSettings(shard_size=64),
                           held_out=json.loads(index)["held_out"]["images"])  # fmt: skip
    assert result.written
    assert (folder / "index.json").read_text() == index  # the shared build is left as it was
    assert {p.name: p.read_bytes() for p in folder.glob("*.tar")} == {
        name: content for name, (content, _) in before.items()
    }


def _sidecars(folder: Path) -> list[bytes]:
    found = []
    for file in sorted(folder.glob("*.tar")):
        with tarfile.open(file) as tar:
            found += [
                tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith("json")
            ]
    return found


def test_an_unreadable_image_is_left_out_and_named(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    images = []
    for index in range(5):
        path = tmp_path / "cpia" / "S" / "set" / f"cell.{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(path)
        images.append({"image_name": f"cell.{index}", "subdataset": "set", "organ": "blood",
                       "scale": "S", "folder": "S", "label": None, "split": "train",
                       "source_tile": None, "path": layout.relative(path)})  # fmt: skip
    (tmp_path / images[2]["path"]).unlink()
    result = export_shards(images, variant="cpia-s", layout=layout,
                           settings=ShardSettings(shard_size=2))  # fmt: skip
    assert [f["file"] for f in result.failures] == [images[2]["path"]]
    assert "cannot read the image" in result.failures[0]["reason"]
    assert result.index["images"] == 4 and len(result.index["shards"]) == 3
    assert not result.written and not layout.shards_dir("cpia-s").exists()  # nothing published


def test_changed_budget_rebuilds_only_partitions_whose_quota_changed(copy_of_small_build) -> None:
    built = copy_of_small_build
    job, instance = built["job"], built["instance"]
    rerun = {
        key: job.execute_in_process(
            partition_key=key,
            asset_selection=[dg.AssetKey("cpia_mini")],
            instance=instance,
            run_config=mini_run_config(organ_xl_budget=1),
        )
        for key in ("wsi-20x", "roi-cells")
    }
    wsi, roi = (_metadata(rerun[key], "cpia_mini") for key in ("wsi-20x", "roi-cells"))
    assert not wsi["reused_from_earlier_run"] and wsi["quota_used"] == 1
    assert roi["reused_from_earlier_run"]
    mini = _frame(built["layout"], "wsi-20x", "mini_images")
    assert mini.filter(pl.col("scale") == "XL").height == 1
    assert not list(built["layout"].root.glob("cpia-mini/*/.*"))  # no staging left


def test_demo_builds_mini_and_its_shards(small_catalog_path: Path, tmp_path: Path) -> None:
    """`make demo`'s driver, on the small catalog: Mini for every partition, then the shards;
    run again with nothing changed, it launches no run (only the source observation)."""
    env = {**os.environ, "CPIA_CATALOG": str(small_catalog_path), "CPIA_DATA_DIR": str(tmp_path),
           "DAGSTER_HOME": str(tmp_path / "home"), "CPIA_WORKERS": "1"}  # fmt: skip

    def demo() -> subprocess.CompletedProcess:
        run = subprocess.run(
            [sys.executable, "-m", "cpia_assets.demo_run"],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run

    run = demo()
    assert UP_TO_DATE not in run.stdout
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        runs = len(instance.get_runs())
        again = demo()
        newest_first = instance.get_runs()
    assert {run.job_name for run in newest_first[: len(newest_first) - runs]} == {OBSERVE_JOB}
    steps = len(load_catalog(small_catalog_path).keys) + 4  # manifest, shards, ssl, evaluation
    assert "random / none / none" in run.stdout  # evaluated on roi-cells, its labelled cells
    assert again.stdout.count(UP_TO_DATE) == steps
    assert "Asset check 'mini_ratios' on 'tile_manifest' passed" in run.stdout
    assert "CPIA-Mini (384 px):" in run.stdout
    layout = DataLayout(tmp_path)
    index = json.loads((layout.shards_dir("cpia-mini") / "index.json").read_text())
    mini_files = list(layout.mini_dir.glob("*/*/*.jpg"))
    assert index["images"] == len(mini_files) > 0
    assert {p.parent.name for p in mini_files} == set(load_catalog(small_catalog_path).keys)
