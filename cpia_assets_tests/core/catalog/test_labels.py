"""Label and split rules: each rule type, maps, defaults, CSV lookups and catalog validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from cpia_assets.core.catalog.fields import CatalogError
from cpia_assets.core.catalog.labels import Annotation, AnnotationError, Annotator, LabelRuleError
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.rules import Rule
from cpia_assets.core.catalog.xlsx import xlsx_rows
from cpia_assets_tests.support.xlsx_factory import write_xlsx

RULE = TypeAdapter(Rule)


def annotator(
    tmp_path: Path, *, labels: dict[str, Any] | None = None, splits: dict[str, Any] | None = None
) -> Annotator:
    return Annotator(
        labels=RULE.validate_python(labels) if labels else None,
        splits=RULE.validate_python(splits) if splits else None,
        source_dir=tmp_path,
    )


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


def load_rule(tmp_path: Path, rule: str) -> dict[str, Any]:
    path = tmp_path / "catalog.yaml"
    path.write_text(ENTRY.format(rule=rule))
    entry = load_catalog(path).get("rules")
    loaded = entry.splits if rule.startswith("splits") else entry.labels
    assert loaded is not None
    return loaded.model_dump(by_alias=True)


def test_catalog_fills_rule_defaults(tmp_path: Path) -> None:
    assert load_rule(tmp_path, "labels: {from: parent_folder}") == {
        "from": "parent_folder",
        "level": 1,
        "map": {},
        "default": None,
    }
    # Folder names YAML reads as numbers stay names.
    assert load_rule(tmp_path, "splits: {from: parent_folder, map: {0: train, 1: test}}") == {
        "from": "parent_folder",
        "level": 1,
        "map": {"0": "train", "1": "test"},
        "default": None,
    }
    assert load_rule(tmp_path, "labels: {from: csv, file: l.csv, image_column: i, column: c}") == {
        "from": "csv",
        "file": ("l.csv",),
        "image_column": "i",
        "column": "c",
        "one_hot": (),
        "delimiter": ",",
        "normalise_names": False,
        "keep_unlisted": False,
        "map": {},
        "default": None,
    }


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("labels: {from: folder}",
         "field 'labels.from': must be one of parent_folder, regex, csv, listed, constant "
         "(got 'folder')"),
        ("splits: {from: constant, value: train}",
         "field 'splits.from': must be one of parent_folder, regex, csv, listed, stratified "
         "(got 'constant')"),
        ("splits: {from: stratified, ratios: {train: 0}}",
         "field 'splits.ratios': needs at least one non-zero ratio"),
        ("splits: {from: stratified, ratios: {dev: 1}}",
         "field 'splits.ratios.dev (key)': input should be 'train', 'val' or 'test' (got 'dev')"),
        ("labels: {level: 2}",
         "field 'labels.from': must be one of parent_folder, regex, csv, listed, and is missing"),
        ("labels: {from: parent_folder, level: 0}",
         "field 'labels.level': input should be greater than or equal to 1 (got 0)"),
        ("labels: {from: parent_folder, level: '2'}",
         "field 'labels.level': input should be a valid integer (got '2')"),
        ("labels: {from: parent_folder, levels: 2}",
         "field 'labels.levels': unknown field; did you mean 'level'?"),
        ("labels: {from: regex, pattern: '(x'}",
         "field 'labels.pattern': '(x' is not a supported regular expression (missing ): (x)"),
        ("labels: {from: regex, pattern: 'x'}",
         r"field 'labels.pattern': 'x' needs a (?P<value>...) group"),
        ("labels: {from: regex, pattern: 40}", "field 'labels.pattern': should be text (got 40)"),
        ("labels: {from: csv, file: l.csv, column: label}",
         "field 'labels.image_column': required field is missing"),
        ("labels: {from: csv, file: f, image_column: i, column: c, delimiter: ';;'}",
         "field 'labels.delimiter': string should have at most 1 character (got ';;')"),
        ("labels: {from: parent_folder, map: [a, b]}",
         "field 'labels.map': should be a mapping (got ['a', 'b'])"),
        ("labels: {from: parent_folder, map: {yes: tumour}}",
         "field 'labels.map.True (key)': YAML reads this unquoted word as the boolean true"),
        ("splits: {from: parent_folder, map: {Training: training}}",
         "field 'splits': the splits rule maps to ['training']; values must be one of"),
        ("splits: {from: parent_folder, default: none}",
         "field 'splits': the splits rule maps to ['none']"),
        ("labels: {from: csv, file: l.csv, image_column: i}",
         "field 'labels.column': give either 'column' or 'one_hot'"),
        ("labels: {from: csv, file: l.csv, image_column: i, column: c, one_hot: [a, b]}",
         "field 'labels.column': give either 'column' or 'one_hot'"),
        ("splits: {from: listed, files: {a.csv: training}, image_column: i}",
         "field 'splits': the splits rule maps to ['training']"),
        ("splits: {from: listed, files: {}, image_column: i}",
         "field 'splits.files': dictionary should have at least 1 item"),
        ("labels: {from: csv, file: [], image_column: i, column: c}",
         "field 'labels.file': value should have at least 1 item"),
    ],
)  # fmt: skip
def test_catalog_rejects_bad_rules(tmp_path: Path, rule: str, message: str) -> None:
    with pytest.raises(CatalogError) as error:
        load_rule(tmp_path, rule)
    assert str(error.value).startswith(f"{tmp_path / 'catalog.yaml'}: entry 'rules' (#1): ")
    assert message in str(error.value)


def test_backreferences_and_lookaround_are_refused_naming_the_entry(tmp_path: Path) -> None:
    """Python's `re` accepts both; RE2 (linear time) cannot run them, and says so at load."""
    for pattern in (r"(?P<value>a)\1", "(?<!x)(?P<value>a)"):
        with pytest.raises(CatalogError, match="RE2 syntax, without backreferences or lookaround"):
            load_rule(tmp_path, f"labels: {{from: regex, pattern: '{pattern}'}}")


def test_a_catastrophic_pattern_runs_in_linear_time(tmp_path: Path) -> None:
    """`(a+)+$` against 40 a's and a mismatch takes Python's backtracking `re` hours; RE2 none.

    Under a backtracking engine this test hangs instead of passing.
    """
    rules = annotator(
        tmp_path, labels={"from": "regex", "pattern": "(?P<value>(a+)+)$", "default": "none"}
    )
    assert rules.annotate("a" * 40 + "!") == Annotation(label="none", split="none")
    assert rules.annotate("x/" + "a" * 40) == Annotation(label="a" * 40, split="none")


def test_xlsx_tables_one_hot_labels_and_listed_splits(tmp_path: Path) -> None:
    """SICAPv2's layout: one-hot grade columns in two workbooks whose names are the split."""
    header = ["image_name", "NC", "G3", "G4", "G5", "G4C"]
    write_xlsx(
        tmp_path / "Train.xlsx",
        [header, ["a.jpg", 1, 0, 0, 0, 0], ["b.jpg", 0, 0, 1, 0, 1], ["both.jpg", 0, 1, 1, 0, 0]],
    )
    write_xlsx(tmp_path / "Test.xlsx", [header, ["c.jpg", 0, None, 0, 1.0, 0]])
    tables = {"image_column": "image_name", "keep_unlisted": True}
    rules = annotator(
        tmp_path,
        labels={"from": "csv", "file": ["Train.xlsx", "Test.xlsx"],
                "one_hot": ["NC", "G3", "G4", "G5"], **tables},
        splits={"from": "listed", "files": {"Train.xlsx": "train", "Test.xlsx": "test"},
                **tables},
    )  # fmt: skip
    assert rules.annotate("images/a.jpg") == Annotation("NC", "train")
    assert rules.annotate("images/b.jpg") == Annotation("G4", "train")  # G4C is not a class
    assert rules.annotate("images/c.jpg") == Annotation("G5", "test")
    assert rules.annotate("images/unlisted.jpg") == Annotation(None, "none")  # kept, unlabelled
    with pytest.raises(
        AnnotationError, match=r"both\.jpg: Train\.xlsx, Test\.xlsx gives it several"
    ):
        rules.annotate("images/both.jpg")


def test_unlisted_images_fail_unless_kept(tmp_path: Path) -> None:
    write_xlsx(tmp_path / "list.xlsx", [["image"], ["a.png"]])
    rules = annotator(
        tmp_path, splits={"from": "listed", "files": {"list.xlsx": "test"}, "image_column": "image"}
    )
    assert rules.annotate("a.png").split == "test"
    with pytest.raises(AnnotationError, match=r"b\.png: the splits rule \(from listed\) gives no"):
        rules.annotate("b.png")


def test_normalised_names_match_a_table_that_spells_them_differently(tmp_path: Path) -> None:
    """Osteosarcoma's CSV writes 'Case 3 - A16-1' for the file Case-3-A16-1.jpg."""
    (tmp_path / "ML_Features.csv").write_text(
        "image.name,classification\nCase 3 - A16-10880-11264,Viable\nP9_set 2 -x,Non-Tumor\n"
    )
    rule = {"from": "csv", "file": "ML_Features.csv", "image_column": "image.name",
            "column": "classification"}  # fmt: skip
    loose = annotator(tmp_path, labels={**rule, "normalise_names": True})
    assert loose.annotate("Training-Set-1/set3/Case-3-A16-10880-11264.jpg").label == "Viable"
    assert loose.annotate("Training-Set-2/p9-Set-2-X.JPG").label == "Non-Tumor"
    strict = annotator(tmp_path, labels=rule)
    with pytest.raises(AnnotationError, match="gives no value"):
        strict.annotate("Training-Set-1/set3/Case-3-A16-10880-11264.jpg")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a zip", "cannot read the label table: not a readable .xlsx workbook"),
        (None, "column(s) ['label'] not found (header: ['image', 'grade'])"),
    ],
)
def test_unreadable_workbooks_are_rule_errors_naming_the_file(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "labels.xlsx"
    if content is None:
        write_xlsx(path, [["image", "grade"], ["a.png", "x"]])
    else:
        path.write_bytes(content)
    rule = {"from": "csv", "file": "labels.xlsx", "image_column": "image", "column": "label"}
    with pytest.raises(LabelRuleError) as error:
        annotator(tmp_path, labels=rule)
    assert str(error.value).startswith(f"{path}: {reason}")


def test_xlsx_cells_sit_under_their_columns(tmp_path: Path) -> None:
    write_xlsx(tmp_path / "t.xlsx", [["a", None, "c"], [None, 2, "x & y"]])
    assert xlsx_rows(tmp_path / "t.xlsx") == [["a", "", "c"], ["", "2", "x & y"]]
