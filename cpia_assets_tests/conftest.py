from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.definitions import PARTITIONED_ASSETS, build_definitions
from cpia_assets_tests.support.paths import TESTDATA
from cpia_assets_tests.support.small_catalog import TEST_CATALOG, copy_build, mini_run_config


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"the shared test slides are expected at {TESTDATA}"
    return TESTDATA


@pytest.fixture(scope="session")
def small_catalog_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog like the demo's, smaller: two WSI and two ROI sub-datasets, synthetic sources."""
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(TEST_CATALOG)
    return path


@pytest.fixture(scope="session")
def small_build(small_catalog_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """The small catalog built once per test process (pytest-xdist worker), in process, like
    `make demo`: every partition through cpia_mini (`mini_run_config`), then tile_manifest
    with its checks and the cpia-mini and cpia-s shards. Tests that read it share it; a test
    that changes it works on a copy (`copy_of_small_build`) or puts back what it changed."""
    data = tmp_path_factory.mktemp("data")
    catalog = load_catalog(small_catalog_path)
    defs = build_definitions(catalog, data, workers=2)
    job = defs.resolve_implicit_global_asset_job_def()
    selection = [dg.AssetKey(name) for name in PARTITIONED_ASSETS]
    with dg.instance_for_test() as instance:
        results = {
            key: job.execute_in_process(
                partition_key=key,
                asset_selection=selection,
                instance=instance,
                run_config=mini_run_config(),
            )
            for key in catalog.keys
        }
        manifest = job.execute_in_process(
            asset_selection=[dg.AssetKey("tile_manifest")], instance=instance
        )
        shards = {
            variant: job.execute_in_process(
                partition_key=variant,
                asset_selection=[dg.AssetKey("training_shards")],
                instance=instance,
                run_config={"ops": {"training_shards": {"config": {"shard_size": 64}}}},
            )
            for variant in ("cpia-mini", "cpia-s")
        }
        yield {
            "layout": DataLayout(data),
            "catalog": catalog,
            "job": job,
            "instance": instance,
            "results": results,
            "manifest": manifest,
            "shards": shards,
        }


@pytest.fixture
def copy_of_small_build(small_build, tmp_path: Path):
    """A private copy of `small_build`'s data folder, with definitions and a fresh instance of
    its own, for a test that rebuilds parts of it."""
    layout, defs = copy_build(small_build, tmp_path / "data")
    with dg.instance_for_test() as instance:
        yield {
            "layout": layout,
            "job": defs.resolve_implicit_global_asset_job_def(),
            "instance": instance,
        }
