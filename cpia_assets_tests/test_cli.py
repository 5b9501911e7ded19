from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

from cpia_assets.cli import main
from cpia_assets.core.fsutil import sha256_file
from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets_tests.support.manifest_data import DataFolder, build_data_folder


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


def test_table1_mini_counts_only_mini_images(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder
) -> None:
    code, out = run(capsys, loaded, "table1", "--mini")
    assert code == 0
    assert "shape: (29, 10)" in out and "multiple organs" in out
    code, out = run(capsys, loaded, "table1", "--mini", "--markdown")
    assert code == 0
    # Mini counts the CPIA-Mini images: of roi-blood's 4 images its 2 train images; the fixture
    # builds no WSI Mini images (without --mini: 22 images, see above).
    assert "| blood | 1 | 0 | 0 | 0 | 0 | 0 | 0 | 2 | 2 |" in out.splitlines()
    assert out.splitlines()[-1] == "| Total | 3 | 0 | 0 | 0 | 0 | 0 | 0 | 2 | 2 |"


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


def test_tiles_output_formats_by_suffix_and_never_overwrites_unasked(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder, tmp_path: Path
) -> None:
    output = tmp_path / "blood.csv"
    code, out = run(capsys, loaded, "tiles", "--organ", "blood", "--output", str(output))
    assert code == 0 and out == f"4 images written to {output}\n"
    assert pl.read_csv(output)["image_name"].sort().to_list() == [f"cell_{i}" for i in range(4)]
    written = output.read_bytes()
    code, out = run(capsys, loaded, "tiles", "--split", "test", "--output", str(output))
    assert (code, out) == (
        2,
        f"cpia: --output {output}: the file exists; add --force to replace it\n",
    )
    assert output.read_bytes() == written
    code, out = run(capsys, loaded, "tiles", "--split", "train", "--output", str(output), "--force")
    assert code == 0 and out.startswith("2 images written")
    assert pl.read_csv(output)["split"].to_list() == ["train", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blood.csv"]  # no temporary left


OWN_DATA = "that is the manifest's own data; choose another file"


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("tiles.txt", "the name must end in .parquet or .csv"),
        ("missing/tiles.parquet", "folder {tmp}/missing does not exist"),
        ("{data}/manifest.duckdb", "the name must end in .parquet or .csv"),
        ("{data}/manifests/wsi-colon/tiles.parquet", OWN_DATA),
        ("link.parquet", OWN_DATA),  # a link to manifest.duckdb
        ("folder.parquet", "is a folder"),
    ],
)
def test_bad_outputs_are_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder, tmp_path: Path, output: str, reason: str
) -> None:
    (tmp_path / "link.parquet").symlink_to(loaded.layout.duckdb_path)
    (tmp_path / "folder.parquet").mkdir()
    target = output.format(data=loaded.layout.root)
    database = loaded.layout.duckdb_path.read_bytes()
    code, out = run(capsys, loaded, "tiles", "--output", str(tmp_path / target), "--force")
    assert (code, out) == (
        2,
        f"cpia: --output {tmp_path / target}: {reason.format(tmp=tmp_path)}\n",
    )
    assert loaded.layout.duckdb_path.read_bytes() == database
    assert (tmp_path / "folder.parquet").is_dir() and not any(
        (tmp_path / "folder.parquet").iterdir()
    )


LIMIT_ERROR = "cpia tiles: error: argument --limit: must be a whole number >= 0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tiles", "--limit", "-1"], f"{LIMIT_ERROR}, got '-1' (see cpia tiles --help)"),
        (["tiles", "--limit", "x"], f"{LIMIT_ERROR}, got 'x'"),
        (["count", "--by", "colour"], "cpia count: error: argument --by: invalid choice: 'colour'"),
        (["nope"], "cpia: error: argument COMMAND: invalid choice: 'nope'"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1


def test_databases_the_pipeline_did_not_write_are_named_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    database = tmp_path / "manifest.duckdb"
    for content, state in ((b"", "an empty file"), (b"SQLite format 3\x00" * 64, "wrong header")):
        database.write_bytes(content)
        assert main(["table1", "--data-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cpia: {database} is not a DuckDB database file: {state}")
        assert "move it away" in err
    database.unlink()
    duckdb.connect(str(database)).close()  # a valid database without tables
    assert main(["failures", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"cpia: {database} holds no manifest tables: materialize the tile_manifest asset to "
        "(re)build it\n"
    )


def test_count_by_organ(capsys: pytest.CaptureFixture[str], loaded: DataFolder) -> None:
    code, out = run(capsys, loaded, "count", "--by", "organ", "--kind", "wsi", "--markdown")
    assert code == 0
    assert out.splitlines()[2:] == ["| breast | 12 |", "| colon | 6 |"]


def test_count_by_none_is_a_single_total(
    capsys: pytest.CaptureFixture[str], loaded: DataFolder
) -> None:
    code, out = run(capsys, loaded, "count", "--by", "none", "--markdown")
    assert (code, out.splitlines()) == (0, ["| images |", "|---:|", "| 22 |"])
    code, out = run(capsys, loaded, "count", "--by", "none", "scale")
    assert (code, out) == (
        2,
        "cpia: --by none (a single total) cannot be combined with other columns\n",
    )


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
