from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest

from cpia_assets.core.catalog import (
    ALL_SCALES,
    TABLE_I_ORGANS,
    CatalogError,
    load_catalog,
)
from cpia_assets_tests.conftest import REFERENCE


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("catch dataset", "catch")).strip("-")


def test_full_catalog_has_every_cpia_subdataset() -> None:
    catalog = load_catalog()
    kinds = Counter(entry.kind for entry in catalog.subdatasets)
    assert kinds == {"wsi": 55, "roi": 48}
    assert len(set(catalog.keys)) == 103
    assert {entry.organ for entry in catalog.subdatasets} <= set(TABLE_I_ORGANS)
    assert catalog.get("prcc").scales == ("M",)
    assert catalog.get("prcc").labelled


def test_full_catalog_agrees_with_published_table() -> None:
    catalog = load_catalog("cpia")
    with (REFERENCE / "cpia_subdatasets.csv").open() as handle:
        published = list(csv.DictReader(handle))
    assert len(published) == 102  # pRCC is the 103rd, from the paper
    for row in published:
        entry = catalog.get(_slug(row["name"]))
        assert entry.name == row["name"]
        assert entry.kind == row["kind"].lower()
        assert sum(entry.published_counts.values()) == int(row["n_images"]), entry.key
        assert set(entry.scales) >= set(row["scales"].split(";")), entry.key


def test_full_catalog_totals_match_the_repository_spreadsheet() -> None:
    totals = Counter()
    for entry in load_catalog().subdatasets:
        for scale, count in entry.published_counts.items():
            totals[(entry.kind, scale)] += count
    # cpia_repo_notes.md: WSI XL 736,719; L 11,245,935; M 68,844,269; S 66,978,086.
    assert totals[("wsi", "XL")] == 736_719
    assert totals[("wsi", "L")] == 11_245_935
    assert totals[("wsi", "M")] == 68_844_269
    assert totals[("wsi", "S")] == 66_978_086
    # ROI: L 287,541, S 199,259; M 670,777 plus pRCC's 1,417 (not in the spreadsheet).
    assert totals[("roi", "L")] == 287_541
    assert totals[("roi", "M")] == 670_777 + 1_417
    assert totals[("roi", "S")] == 199_259


def test_split_scale_rules_route_by_path() -> None:
    catalog = load_catalog()
    breakhis = catalog.get("breakhis")
    assert breakhis.scale_for("benign/SOB_B_A-14-22549AB-40-001/40X/a.png") == "L"
    assert breakhis.scale_for("malignant/DC/200X/b.png") == "M"
    gashis = catalog.get("gashissdb")
    assert gashis.scale_for("160/Normal/x.jpg") == "M"
    assert gashis.scale_for("80/Abnormal/x.jpg") == "S"
    assert gashis.scale_for("120/Normal/x.jpg") is None  # not part of CPIA


def test_demo_catalog_is_self_contained() -> None:
    catalog = load_catalog("demo")
    kinds = Counter(entry.kind for entry in catalog.subdatasets)
    assert kinds["wsi"] >= 2
    assert kinds["roi"] >= 2
    assert all(entry.source["type"] == "synthetic" for entry in catalog.subdatasets)
    mpps = {s["mpp"] for e in catalog.subdatasets if e.kind == "wsi" for s in e.source["slides"]}
    assert {0.25, 0.5} <= mpps
    assert all(e.labelled and e.splits for e in catalog.subdatasets if e.kind == "roi")
    assert set(ALL_SCALES) == set(catalog.get("demo-wsi-40x").scales)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


GOOD_ENTRY = """
- key: my-slides
  name: My slides
  kind: wsi
  organ: breast
  source: {type: local, path: slides}
"""


def test_user_catalog_resolves_local_paths_relative_to_the_file(tmp_path: Path) -> None:
    catalog = load_catalog(_write(tmp_path, "subdatasets:" + GOOD_ENTRY))
    assert catalog.get("my-slides").source["path"] == str(tmp_path / "slides")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("subdatasets:" + GOOD_ENTRY + GOOD_ENTRY, "duplicate key 'my-slides'"),
        ("subdatasets:" + GOOD_ENTRY.replace("kind: wsi", "kind: tma"), "unknown kind 'tma'"),
        (
            "subdatasets:" + GOOD_ENTRY.replace("  source: {type: local, path: slides}\n", ""),
            "missing required field 'source'",
        ),
        ("subdatasets:" + GOOD_ENTRY.replace("type: local", "type: ftp"), "unknown source type"),
        (
            "subdatasets:" + GOOD_ENTRY.replace("kind: wsi", "kind: roi\n  scale: XXL"),
            "unknown scale 'XXL'",
        ),
        ("subdatasets:" + GOOD_ENTRY.replace("kind: wsi", "kind: roi"), "need 'scale'"),
        ("subdatasets:" + GOOD_ENTRY.replace("key: my-slides", "key: My Slides"), "lower-case"),
        ("things: []", "top-level 'subdatasets:' list"),
        ("subdatasets: [", "not valid YAML"),
    ],
)
def test_bad_catalogs_are_rejected_with_the_file_and_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_missing_catalog_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "nope.yaml")
