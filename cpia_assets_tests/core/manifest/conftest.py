"""Fixtures of the manifest tests: the data folder, before and after a first load."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets_tests.support.manifest_data import DataFolder, build_data_folder


@pytest.fixture
def data(tmp_path: Path) -> DataFolder:
    return build_data_folder(tmp_path / "data")


@pytest.fixture
def loaded(data: DataFolder) -> DataFolder:
    load_manifest(data.layout, data.catalog)
    return data
