"""`dagster asset materialize` in a subprocess, with sources served by a real HTTP server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl

from cpia_assets.core.layout import DataLayout
from cpia_assets_tests.support.http_server import FakeServer, write_server_catalog


def _materialize(env: dict[str, str], selection: str, partition: str) -> None:
    command = [
        sys.executable, "-m", "dagster", "asset", "materialize", "-m", "cpia_assets.definitions",
        "--select", selection, "--partition", partition,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_cli_materializes_served_sources_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {
        **os.environ,
        "CPIA_CATALOG": str(tmp_path / "catalog.yaml"),
        "CPIA_DATA_DIR": str(data),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "CPIA_WORKERS": "1",
    }
    (tmp_path / "home").mkdir()
    layout = DataLayout(data)
    with FakeServer() as server:
        write_server_catalog(tmp_path / "catalog.yaml", server)
        _materialize(env, "raw_download,standardized_wsi", "srv-wsi")
        _materialize(env, "raw_download,standardized_wsi,scale_tiles", "srv-roi")
        requests_after_first_runs = len(server.requests)
        _materialize(env, "raw_download", "srv-wsi")
        assert len(server.requests) == requests_after_first_runs  # a rerun fetches nothing

    raw = pl.read_parquet(layout.manifest_file("srv-wsi", "raw_files"))
    assert raw["rel_path"].to_list() == ["CMU-1-Small-Region.svs"]
    slides = pl.read_parquet(layout.manifest_file("srv-wsi", "slides"))
    assert slides["mpp_x"].to_list() == [0.499]
    assert (data / slides["standardized_file"][0]).is_file()

    tiles = pl.read_parquet(layout.manifest_file("srv-roi", "tiles"))
    assert tiles.height == 2 * (3 + 1 + 1)
    assert set(tiles["label"]) == {"lymphocyte", "neutrophil"}
    assert all((data / path).is_file() for path in tiles["path"])
