"""The full CPIA catalog's data: which source files each entry takes, as the paper counted them."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpia_assets.core.catalog import load_catalog
from cpia_assets.core.labels import Annotator


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
