from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TESTDATA = SHARED / "testdata"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"the shared test slides are expected at {TESTDATA}"
    return TESTDATA


TEST_CATALOG = """\
subdatasets:
- key: wsi-40x
  name: Test WSI 40x
  kind: wsi
  organ: breast
  about: {licence: CC0 1.0, redistributable: true, stain: H&E, diseases: [none (demo)],
          pathology: histopathology, year: 2026,
          landing_page: "https://openslide.cs.cmu.edu/download/openslide-testdata/"}
  source:
    type: synthetic
    recipe: wsi
    slides:
    - {name: T40-0001, width: 8000, height: 7900, mpp: 0.25, seed: 5}
- key: wsi-20x
  name: Test WSI 20x
  kind: wsi
  organ: colon
  source:
    type: synthetic
    recipe: wsi
    slides:
    - {name: T20-0001, width: 4000, height: 3950, mpp: 0.5, seed: 6}
    - {name: T20-0002, width: 4100, height: 3950, mpp: 0.5, seed: 7}
- key: roi-cells
  name: Test ROI cells
  kind: roi
  organ: blood
  scale: S
  labelled: true
  labels: {from: parent_folder, level: 1}
  splits: {from: parent_folder, level: 2}
  source: {type: synthetic, recipe: roi, layout: folders, classes: [lymphocyte, neutrophil],
           per_split: {train: 2, val: 1, test: 1}, seed: 31}
- key: roi-tissue
  name: Test ROI tissue
  kind: roi
  organ: colorectum
  labelled: true
  scale_rules:
  - {pattern: '(?i)(^|/)40x/', scale: L}
  - {pattern: '(?i)(^|/)200x/', scale: M}
  labels: {from: csv, file: labels.csv, image_column: image, column: label}
  splits: {from: csv, file: labels.csv, image_column: image, column: split}
  source: {type: synthetic, recipe: roi, layout: csv, classes: [tumour, normal],
           magnifications: [40x, 200x], per_split: {train: 2, val: 1, test: 1}, seed: 41}
"""


@pytest.fixture(scope="session")
def small_catalog_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog like the demo's, smaller: two WSI and two ROI sub-datasets, synthetic sources."""
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(TEST_CATALOG)
    return path
