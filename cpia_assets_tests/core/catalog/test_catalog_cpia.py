"""The full CPIA catalog's data: which source files each entry takes, as the paper counted them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cpia_assets.core.catalog.fields import CatalogError
from cpia_assets.core.catalog.labels import Annotation, Annotator
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.rules import StratifiedSplit
from cpia_assets.core.manifest.paper_table_i import PAPER_TABLE_I
from cpia_assets_tests.support.xlsx_factory import write_xlsx


@pytest.fixture(scope="module")
def cpia():
    return load_catalog("cpia")


@pytest.mark.parametrize(
    ("key", "path", "scale"),
    [
        # Breast_Histopathology_Images: the duplicate IDC_regular_ps50_idx5/ copy is left out.
        ("breast-histopathology-images", "10253/1/10253_idx5_x501_y351_class1.png", "L"),
        ("breast-histopathology-images",
         "IDC_regular_ps50_idx5/10253/1/10253_idx5_x501_y351_class1.png", None),
        # Blood_Cell_Images: TRAIN only (9,957), not TEST / TEST_SIMPLE.
        ("blood-cell-images", "dataset2-master/dataset2-master/images/TRAIN/MONOCYTE/_0_9.jpeg",
         "S"),
        ("blood-cell-images", "dataset2-master/dataset2-master/images/TEST/MONOCYTE/_0_9.jpeg",
         None),
        ("blood-cell-images",
         "dataset2-master/dataset2-master/images/TEST_SIMPLE/MONOCYTE/_0_9.jpeg", None),
        ("blood-cell-images", "dataset-master/dataset-master/JPEGImages/BloodImage_00001.jpg",
         None),
        # SIPaKMeD: the full-view images (966, published 1,004), not the 4,049 CROPPED cells.
        ("sipakmed", "im_Koilocytotic/im_Koilocytotic/012.bmp", "S"),
        ("sipakmed", "im_Koilocytotic/im_Koilocytotic/CROPPED/012_03.bmp", None),
    ],
)  # fmt: skip
def test_sources_take_only_the_files_cpia_counted(cpia, key: str, path: str, scale: str | None):
    assert cpia.get(key).scale_for(path) == scale


def test_colorectal_histology_mnist_is_labelled_by_its_class_folders(cpia, tmp_path: Path):
    entry = cpia.get("colorectal-histology-mnist")
    assert entry.labelled
    annotator = Annotator(labels=entry.labels, splits=None, source_dir=tmp_path)
    tile = "Kather_texture_2016_image_tiles_5000/01_TUMOR/1A11_CRC-Prim-HE-07_022.tif_Row_601.tif"
    assert annotator.annotate(tile).label == "TUMOR"
    larger = "Kather_texture_2016_larger_images_10/CRC-Prim-HE-01_APPLICATION.tif"
    assert annotator.annotate(larger).label == "mixed"  # several tissues per image


def test_table_i_rows_give_the_papers_sub_dataset_counts(cpia):
    assert Counter(entry.kind for entry in cpia.subdatasets) == {"wsi": 55, "roi": 48}
    per_row = Counter(entry.table_i_organ for entry in cpia.subdatasets)
    assert per_row == {organ: counts[0] for organ, counts in PAPER_TABLE_I.items()}
    assert sum(per_row.values()) == 103 and len(per_row) == 28


def test_roi_assignment_reproduces_table_i_roi_columns(cpia):
    """Per row and scale, the per-set ROI counts add up to Table I's ROI columns; the one
    difference is kidney, where Table I has 1,419 and pRCC's published count is 1,417."""
    built: Counter[tuple[str, str]] = Counter()
    for entry in cpia.subdatasets:
        if entry.kind == "roi":
            for scale, count in entry.published_counts.items():
                built[entry.table_i_organ, scale] += count
    roi_columns = {"L": 3, "M": 5, "S": 7}  # positions in PAPER_TABLE_I rows
    paper = Counter({(organ, scale): counts[column] for organ, counts in PAPER_TABLE_I.items()
                     for scale, column in roi_columns.items() if counts[column]})  # fmt: skip
    assert {key: paper[key] - built[key] for key in paper if paper[key] != built[key]} == {
        ("kidney", "M"): 2
    }
    assert set(built) == set(paper)


@pytest.mark.parametrize(
    ("key", "organ", "row"),
    [
        ("sipakmed", "cervix uteri", "bone marrow"),
        ("mars", "stomach", "stomach"),
        ("monuseg-train-test", "multiple organs", "breast"),
        ("lung-and-colon-cancer-histopathological-images-colon", "colon", "colon"),
        ("crchistophenotypes", "colorectum", "colorectum"),
        ("warwick-cls", "colorectum", "colorectum"),
        ("tcga-hnsc", "oral cavity", "oral cavity"),
        ("cptac-hnscc", "head and neck", "head and neck"),
        ("tcga-lusc", "lung", "multiple organs"),
    ],
)
def test_real_organ_and_table_i_row(cpia, key: str, organ: str, row: str):
    entry = cpia.get(key)
    assert (entry.organ, entry.table_i_organ) == (organ, row)


def test_every_labelled_set_has_a_label_rule_and_a_split(cpia):
    labelled = [entry for entry in cpia.subdatasets if entry.labelled]
    assert [entry.key for entry in labelled if entry.labels is None] == []
    assert [entry.key for entry in labelled if entry.splits is None] == []
    stratified = {entry.key for entry in labelled if isinstance(entry.splits, StratifiedSplit)}
    assert {"crc-tp", "prcc", "osteosarcoma-tumor-assessment"} <= stratified
    assert len(stratified) == 15
    assert all(
        cpia.get(key).splits.ratios == {"train": 7, "val": 1, "test": 2} for key in stratified
    )
    assert not [entry.key for entry in cpia.subdatasets if not entry.labelled and entry.labels]


def test_sicapv2_takes_grades_and_official_split_from_its_partition_workbooks(cpia, tmp_path):
    entry = cpia.get("sicapv2")
    partition = tmp_path / "SICAPv2" / "partition" / "Test"
    partition.mkdir(parents=True)
    header = ["image_name", "NC", "G3", "G4", "G5", "G4C"]
    write_xlsx(
        partition / "Train.xlsx",
        [header, ["16B0001851_Block_Region_1_0_0_xini_6827_yini_59786.jpg", 0, 0, 1, 0, 1]],
    )
    write_xlsx(
        partition / "Test.xlsx",
        [header, ["18B0006169B_Block_Region_3_2_5_xini_1_yini_2.jpg", 1, 0, 0, 0, 0]],
    )
    annotator = Annotator(labels=entry.labels, splits=entry.splits, source_dir=tmp_path)
    train = "SICAPv2/images/16B0001851_Block_Region_1_0_0_xini_6827_yini_59786.jpg"
    test = "SICAPv2/images/18B0006169B_Block_Region_3_2_5_xini_1_yini_2.jpg"
    assert annotator.annotate(train) == Annotation("G4", "train")
    assert annotator.annotate(test) == Annotation("NC", "test")
    assert annotator.annotate("SICAPv2/images/unlisted.jpg") == Annotation(None, "none")
    assert entry.scale_for(train) == "M"
    assert (
        entry.scale_for("SICAPv2/masks/16B0001851_Block_Region_1_0_0_xini_6827_yini_59786.png")
        is None
    )


def test_osteosarcoma_matches_the_csv_names_to_the_files(cpia, tmp_path):
    entry = cpia.get("osteosarcoma-tumor-assessment")
    (tmp_path / "ML_Features_1144.csv").write_text(
        "image.name,classification\n"
        "Case 3 - A16-10880-11264,viable: non-viable\n"
        "Case 4 - B10-23456-12345,Non-Viable-Tumor\n"
        "P9 - C1-1-2,Non-Tumor\n"
    )
    annotator = Annotator(labels=entry.labels, splits=None, source_dir=tmp_path)
    labels = {
        name: annotator.annotate(f"Training-Set-1/set/{name}.jpg").label
        for name in ("Case-3-A16-10880-11264", "Case-4-B10-23456-12345", "P9-C1-1-2")
    }
    assert labels == {"Case-3-A16-10880-11264": "viable tumor",
                      "Case-4-B10-23456-12345": "necrotic tumor",
                      "P9-C1-1-2": "non-tumor"}  # fmt: skip


def test_every_entry_says_what_users_ask_about(cpia):
    for entry in cpia.subdatasets:
        about = entry.about
        assert about.licence and about.landing_page.startswith(("http", "unknown")), entry.key
        assert entry.redistributable is about.redistributable
    unknown_pages = {e.key for e in cpia.subdatasets if e.about.landing_page == "unknown"}
    assert unknown_pages == {"mars", "weinart-et-al-scientific-reports-2012"}
    flagged = {entry.key for entry in cpia.subdatasets if entry.redistributable is False}
    assert flagged == {"paip2019", "paip2020", "paip2021"}
    assert cpia.get("pcam").about.licence == "CC0 1.0" and cpia.get("pcam").redistributable
    assert cpia.get("sipakmed").about.pathology == "cytopathology"


def test_single_class_malaria_sets_label_every_image_alike(cpia, tmp_path: Path):
    labels = {}
    for key in ("p-falciparum", "p-vivax", "p-uninfected"):
        annotator = Annotator(labels=cpia.get(key).labels, splits=None, source_dir=tmp_path)
        labels[key] = annotator.annotate("patient-12/IMG_20150608_162600.jpg").label
    assert labels == {"p-falciparum": "P. falciparum", "p-vivax": "P. vivax",
                      "p-uninfected": "uninfected"}  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("table_i_row: cervix",
         "field 'table_i_row': 'cervix' is not an organ row of the paper's Table I; "
         "did you mean 'cervix uteri'?"),
        ("about: {year: '2019'}",
         "field 'about.year': should be a year such as 2019, or 'unknown' (got '2019')"),
        ("about: {pathology: histology}", "field 'about.pathology'"),
        ("about: {licence: CC0, redistributable: 'yes'}", "field 'about.redistributable'"),
        ("about: {licence: CC0, licensee: x}",
         "field 'about.licensee': unknown field; did you mean 'licence'?"),
        ("tissue_thresholds: {saturation: 1.5}", "field 'tissue_thresholds.saturation'"),
        ("kind: roi\n  scale: M\n  tissue_thresholds: {saturation: 0.05}",
         "field 'tissue_thresholds': applies to WSI sub-datasets only"),
    ],
)  # fmt: skip
def test_new_catalog_fields_are_validated(tmp_path: Path, fields: str, message: str):
    kind = "" if fields.startswith("kind:") else "kind: wsi\n  "
    (tmp_path / "catalog.yaml").write_text(
        "subdatasets:\n- key: x\n  name: X\n  organ: breast\n  source: {type: manual, "
        f"landing_page: 'https://example.org'}}\n  {kind}{fields}\n"
    )
    with pytest.raises(CatalogError) as error:
        load_catalog(tmp_path / "catalog.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith(f"{tmp_path / 'catalog.yaml'}: entry 'x' (#1): ")
