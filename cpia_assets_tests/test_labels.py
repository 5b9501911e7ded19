"""Label and split rules: each rule type, maps, defaults, CSV lookups and catalog validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cpia_assets.core.catalog import CatalogError, load_catalog
from cpia_assets.core.labels import (
    Annotation,
    AnnotationError,
    Annotator,
    LabelRuleError,
)


def annotator(
    tmp_path: Path, *, labels: dict[str, Any] | None = None, splits: dict[str, Any] | None = None
) -> Annotator:
    return Annotator(labels=labels, splits=splits, source_dir=tmp_path)


def test_no_rules_give_null_label_and_split_none(tmp_path: Path) -> None:
    assert annotator(tmp_path).annotate("a/b.png") == Annotation(label=None, split="none")


def test_parent_folder_levels(tmp_path: Path) -> None:
    rules = annotator(
        tmp_path,
        labels={"from": "parent_folder", "level": 1},
        splits={"from": "parent_folder", "level": 2},
    )
    assert rules.annotate("val/neutrophil/n_001.bmp") == Annotation("neutrophil", "val")
    assert rules.annotate("extra/test/lymphocyte/x.png") == Annotation("lymphocyte", "test")
    with pytest.raises(AnnotationError, match=r"lonely/x\.png: the splits rule"):
        rules.annotate("lonely/x.png")  # no grandparent folder


def test_regex_rule_with_default(tmp_path: Path) -> None:
    rules = annotator(
        tmp_path,
        labels={"from": "regex", "pattern": r"SOB_(?P<value>[BM])_(?:[A-Z]+)-"},
        splits={
            "from": "regex",
            "pattern": r"fold(?P<value>\d)",
            "map": {"1": "test"},
            "default": "train",
        },
    )
    assert rules.annotate("x/SOB_M_DC-14-2523-100-007.png") == Annotation("M", "train")
    assert rules.annotate("fold1/SOB_B_TA-14-1-40-1.png") == Annotation("B", "test")
    with pytest.raises(AnnotationError, match=r"benign\.png: the labels rule \(from regex\)"):
        rules.annotate("fold2/benign.png")


def test_split_values_are_mapped_and_checked(tmp_path: Path) -> None:
    rules = annotator(
        tmp_path,
        splits={"from": "parent_folder", "map": {"Training": "train", "Testing": "test"}},
    )
    assert rules.annotate("Training/a.png").split == "train"
    assert rules.annotate("Testing/a.png").split == "test"
    assert rules.annotate("val/a.png").split == "val"  # already a split value
    with pytest.raises(AnnotationError, match=r"'Validation' is not one of .*'map'"):
        rules.annotate("Validation/a.png")


def test_label_map_translates_codes(tmp_path: Path) -> None:
    rules = annotator(tmp_path, labels={"from": "parent_folder", "map": {"0": "benign"}})
    assert rules.annotate("0/a.png").label == "benign"
    assert rules.annotate("1/a.png").label == "1"


def test_csv_lookup_by_path_name_and_stem(tmp_path: Path) -> None:
    (tmp_path / "meta.csv").write_text(
        "\ufeffimage;grade;fold\n"  # a BOM and ';' as in many spreadsheet exports
        "train/a.png;benign;Training\n"
        "test/a.png;malignant;Testing\n"
        "b.tif;benign;Training\n"
        ".\\deep\\c.jpg;malignant;Testing\n"
        "d;benign;Training\n"
        "e.png;;Training\n"
    )
    common = {"from": "csv", "file": "meta.csv", "image_column": "image", "delimiter": ";"}
    rules = annotator(
        tmp_path,
        labels={**common, "column": "grade"},
        splits={**common, "column": "fold", "map": {"Training": "train", "Testing": "test"}},
    )
    assert rules.annotate("train/a.png") == Annotation("benign", "train")
    assert rules.annotate("test/a.png") == Annotation("malignant", "test")
    assert rules.annotate("any/folder/b.tif") == Annotation("benign", "train")  # by name
    assert rules.annotate("deep/c.jpg") == Annotation("malignant", "test")  # Windows path
    assert rules.annotate("x/d.png") == Annotation("benign", "train")  # by stem
    with pytest.raises(AnnotationError, match=r"other/a\.png: meta\.csv gives it several values"):
        rules.annotate("other/a.png")  # 'a.png' is benign in one row, malignant in another
    with pytest.raises(AnnotationError, match=r"e\.png: the labels rule \(from csv\) gives no"):
        rules.annotate("e.png")  # listed with an empty label
    with pytest.raises(AnnotationError, match="unlisted"):
        rules.annotate("unlisted.png")


def test_csv_problems_are_rule_errors(tmp_path: Path) -> None:
    rule = {"from": "csv", "file": "labels.csv", "image_column": "image", "column": "label"}
    with pytest.raises(LabelRuleError, match=r"labels\.csv: cannot read"):
        annotator(tmp_path, labels=rule)
    (tmp_path / "labels.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(LabelRuleError, match=r"column\(s\) \['image'\] not found"):
        annotator(tmp_path, labels=rule)


ENTRY = """\
subdatasets:
- key: rules
  name: Rules
  kind: roi
  organ: blood
  scale: S
  source: {{type: manual, landing_page: 'https://example.org/rules'}}
  {rule}
"""


def load_rule(tmp_path: Path, rule: str) -> dict[str, Any] | None:
    path = tmp_path / "catalog.yaml"
    path.write_text(ENTRY.format(rule=rule))
    entry = load_catalog(path).get("rules")
    return entry.splits if rule.startswith("splits") else entry.labels


def test_catalog_fills_rule_defaults(tmp_path: Path) -> None:
    assert load_rule(tmp_path, "labels: {from: parent_folder}") == {
        "from": "parent_folder",
        "level": 1,
        "map": {},
    }
    assert load_rule(tmp_path, "splits: {from: parent_folder, map: {0: train, 1: test}}") == {
        "from": "parent_folder",
        "level": 1,
        "map": {"0": "train", "1": "test"},
    }


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("labels: {from: folder}", "'from' one of"),
        ("labels: {from: parent_folder, level: 0}", "level must be an integer >= 1"),
        ("labels: {from: parent_folder, levels: 2}", r"unknown field\(s\) \['levels'\]"),
        ("labels: {from: regex, pattern: '(x'}", "bad labels pattern"),
        ("labels: {from: regex, pattern: 'x'}", r"needs a \(\?P<value>"),
        ("labels: {from: csv, file: l.csv, column: label}", "needs 'file', 'image_column'"),
        ("labels: {from: csv, file: f, image_column: i, column: c, delimiter: ';;'}", "one char"),
        ("labels: {from: parent_folder, map: [a, b]}", "'map' must be a mapping"),
        ("splits: {from: parent_folder, map: {Training: training}}", r"maps to \['training'\]"),
        ("splits: {from: parent_folder, default: none}", r"maps to \['none'\]"),
    ],
)  # fmt: skip
def test_catalog_rejects_bad_rules(tmp_path: Path, rule: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        load_rule(tmp_path, rule)
