from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from cpia_assets.cli import main
from cpia_assets.core.fsutil import sha256_file
from cpia_assets.core.manifest import load_manifest
from cpia_assets_tests.test_manifest import DataFolder, build_data_folder


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> DataFolder:
    data = build_data_folder(tmp_path_factory.mktemp("cli") / "data")
    load_manifest(data.layout, data.catalog)
    return data


def run(capsys: pytest.CaptureFixture[str], data: DataFolder, *args: str) -> tuple[int, str]:
    code = main(["--data-dir", str(data.layout.root), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_table1_as_markdown(capsys: pytest.CaptureFixture[str], loaded: DataFolder) -> None:
    code, out = run(capsys, loaded, "table1", "--markdown")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (
        "| organ | sub-datasets | WSIs-XL | WSIs-L | ROIs-L | WSIs-M | ROIs-M | WSIs-S | ROIs-S "
        "| total |"
    )
    assert "| breast | 1 | 2 | 4 | 0 | 4 | 0 | 2 | 0 | 12 |" in lines
    assert lines[-1] == "| Total | 3 | 3 | 6 | 0 | 6 | 0 | 3 | 4 | 22 |"


def test_table1_mini_prints_a_frame(capsys: pytest.CaptureFixture[str], loaded: DataFolder) -> None:
    code, out = run(capsys, loaded, "table1", "--mini")
    assert code == 0
    assert "shape: (29, 10)" in out and "multiple organs" in out


def test_table1_mini_counts_only_mini_images(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder
) -> None:
    """Every WSI tile of the fixture is in Mini, but only the 2 training ROI images of 4."""
    code, out = run(capsys, loaded, "table1", "--mini", "--markdown")
    assert code == 0
    assert out.splitlines()[-1] == "| Total | 3 | 3 | 6 | 0 | 6 | 0 | 3 | 2 | 20 |"


def test_tiles_filters_and_limit(capsys: pytest.CaptureFixture[str], loaded: DataFolder) -> None:
    code, out = run(capsys, loaded, "tiles", "--subdataset", "wsi-breast", "--scale", "M",
                    "--limit", "1", "--markdown")  # fmt: skip
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| wsi-breast")]
    assert len(rows) == 1 and "BRS-0001-384-0-0" in rows[0]


def test_tiles_output_writes_every_match(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder, tmp_path: Path
) -> None:
    output = tmp_path / "train.parquet"
    code, out = run(capsys, loaded, "tiles", "--split", "train", "--split", "val",
                    "--limit", "1", "--output", str(output))  # fmt: skip
    assert code == 0 and "3 images written" in out
    written = pl.read_parquet(output)
    assert sorted(written["image_name"]) == ["cell_0", "cell_1", "cell_2"]
    assert set(written["organ"]) == {"blood"}


def test_count_by_organ(capsys: pytest.CaptureFixture[str], loaded: DataFolder) -> None:
    code, out = run(capsys, loaded, "count", "--by", "organ", "--kind", "wsi", "--markdown")
    assert code == 0
    assert out.splitlines()[2:] == ["| breast | 12 |", "| colon | 6 |"]


def test_lineage_shows_the_source_sha256(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder
) -> None:
    code, out = run(capsys, loaded, "lineage", "COL-0001-960-1-4", "--markdown")
    assert code == 0
    sha256 = sha256_file(loaded.layout.raw_dir("wsi-colon") / "COL-0001.svs")
    source = next(line for line in out.splitlines() if "| source file |" in line)
    assert sha256 in source and "run-raw-1" in source
    assert "| L tile | scale_tiles | cpia/L/wsi-colon/COL-0001-960-1-4.jpg |" in out


def test_unknown_image_and_missing_manifest_exit_2(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder, tmp_path: Path
) -> None:
    code, out = run(capsys, loaded, "lineage", "nope")
    assert code == 2 and "no kept image named 'nope'" in out
    code = main(["table1", "--data-dir", str(tmp_path)])
    assert code == 2
    assert f"{tmp_path / 'manifest.duckdb'} does not exist" in capsys.readouterr().err


def test_failures_and_data_dir_from_the_environment(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPIA_DATA_DIR", str(loaded.layout.root))
    assert main(["failures", "--stage", "standardized_wsi", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "raw/wsi-colon/COL-0002.svs" in lines[2] and "no MPP" in lines[2]


def test_compare_built_with_published(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder
) -> None:
    code, out = run(capsys, loaded, "compare", "--built-only", "--markdown")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (
        "| subdataset | organ | kind | built_xl | published_xl | ratio_xl | built_l | published_l "
        "| ratio_l | built_m | published_m | ratio_m | built_s | published_s | ratio_s |"
    )
    assert lines[2:] == [
        "| roi-blood | blood | roi | 0 |  |  | 0 |  |  | 0 | 0 |  | 4 | 8 | 0.5 |",
        "| wsi-breast | breast | wsi | 2 | 4 | 0.5 | 4 | 16 | 0.25 | 4 | 40 | 0.1 | 2 | 2 | 1 |",
        "| wsi-colon | colon | wsi | 1 |  |  | 2 |  |  | 2 |  |  | 1 |  |  |",
    ]
    code, out = run(capsys, loaded, "compare")
    assert code == 0 and "shape: (3, 15)" in out


def test_python_dash_m_runs_the_cli(loaded: DataFolder) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cpia_assets", "--data-dir", str(loaded.layout.root), "count",
         "--by", "--markdown"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["| images |", "|---:|", "| 22 |"]
