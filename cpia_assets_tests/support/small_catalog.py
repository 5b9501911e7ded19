"""The small catalog most integration tests build: two WSI and two ROI sub-datasets with
synthetic sources (like the demo's, smaller), and the CPIA-Mini settings they build it with."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg

from cpia_assets.core.layout import DataLayout
from cpia_assets.definitions import build_definitions

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

EXCLUDED_SLIDE = "T20-0002"
MINI_CONFIG = {
    "organ_xl_budget": 2,
    "exclusions": {"rules": [f"wsi-20x:{EXCLUDED_SLIDE}*"]},
}
"""A small Mini budget, and one slide of wsi-20x kept out as if it were an evaluation slide."""


def mini_run_config(**overrides: Any) -> dict[str, Any]:
    return {"ops": {"cpia_mini": {"config": MINI_CONFIG | overrides}}}


def copy_build(build: dict[str, Any], data: Path) -> tuple[DataLayout, dg.Definitions]:
    """`build`'s data folder copied to `data` (without its manifest database, which the copy's
    own tile_manifest rebuilds), and definitions over the copy."""
    shutil.copytree(build["layout"].root, data, symlinks=True)
    layout = DataLayout(data)
    layout.duckdb_path.unlink(missing_ok=True)
    return layout, build_definitions(build["catalog"], data, workers=1)
