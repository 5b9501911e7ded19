"""Table I reports (the paper's numbers beside the built ones in `cpia table1 --paper`,
`cpia compare --table-i` and tile_manifest's metadata; rows by `table_i_row`) and the per-set
facts of `cpia datasets`."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from cpia_assets.core.catalog.fields import TABLE_I_ORGANS
from cpia_assets.core.catalog.model import About, Catalog
from cpia_assets.core.manifest.database import open_manifest
from cpia_assets.core.manifest.loading import load_manifest
from cpia_assets.core.manifest.paper_table_i import (
    PAPER_TABLE_I,
    PAPER_TOTALS,
    beside_paper,
    paper_frame,
)
from cpia_assets.core.manifest.queries import TileFilter, count_tiles, table_i
from cpia_assets_tests.support.manifest_data import DataFolder, build_data_folder
from cpia_assets_tests.support.paths import REFERENCE
from cpia_assets_tests.test_cli import run


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> DataFolder:
    data = build_data_folder(tmp_path_factory.mktemp("paper") / "data")
    load_manifest(data.layout, data.catalog)
    return data


def test_paper_rows_are_the_table_i_organs_and_add_up_to_its_totals():
    assert tuple(PAPER_TABLE_I) == TABLE_I_ORGANS
    column_sums = tuple(sum(column) for column in zip(*PAPER_TABLE_I.values(), strict=True))
    assert column_sums == PAPER_TOTALS
    assert PAPER_TOTALS[0] == 103 and sum(PAPER_TOTALS[1:]) == 21_427_877
    frame = paper_frame()
    assert frame.filter(pl.col("organ") == "Total")["total"].item() == 21_427_877


def test_paper_numbers_match_the_specification_table():
    """Every organ row of cpia-spec.md's "Table I in full" equals the stored numbers."""
    spec = (REFERENCE / "cpia-spec.md").read_text()
    rows = re.findall(r"^\| \d+ \| ([a-z ]+?)(?: \(printed .*?\))? \| (.+) \|$", spec, re.M)
    assert len(rows) == 28
    for organ, cells in rows:
        numbers = tuple(int(cell.replace(",", "")) for cell in cells.split(" | "))
        assert PAPER_TABLE_I[organ] == numbers, organ


def test_beside_paper_puts_each_paper_number_after_the_built_one(loaded: DataFolder):
    with open_manifest(loaded.layout) as con:
        built = table_i(con)
    report = beside_paper(built)
    assert report.columns[:5] == [
        "organ", "sub-datasets", "sub-datasets (paper v1)", "WSIs-XL", "WSIs-XL (paper v1)",
    ]  # fmt: skip
    assert report["organ"].to_list() == built["organ"].to_list()
    breast = report.filter(pl.col("organ") == "breast").to_dicts()[0]
    assert breast["WSIs-XL"] == built.filter(pl.col("organ") == "breast")["WSIs-XL"].item()
    assert breast["WSIs-XL (paper v1)"] == 3_884 and breast["ROIs-L (paper v1)"] == 279_861
    total = report.filter(pl.col("organ") == "Total").to_dicts()[0]
    assert total["total (paper v1)"] == 21_427_877 and total["sub-datasets (paper v1)"] == 103


@pytest.mark.parametrize("command", [("table1", "--paper"), ("compare", "--table-i")])
def test_cli_shows_the_paper_beside_the_built_counts(
    capsys: pytest.CaptureFixture[str],
    loaded: DataFolder,
    command: tuple[str, ...],
):
    code, out = run(capsys, loaded, *command, "--markdown")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("| organ | sub-datasets | sub-datasets (paper v1) | WSIs-XL |")
    assert "| breast | 1 | 13 | 2 | 3884 |" in "\n".join(lines).replace(",", "")
    assert lines[-1].startswith("| Total | 3 | 103 |")


def test_table_i_counts_a_set_under_its_table_i_row_and_filters_by_its_organ(tmp_path: Path):
    """roi-blood counted under 'bone marrow' in Table I (like SIPaKMeD), still 'blood' by organ."""
    data = build_data_folder(tmp_path / "data")
    moved = [
        entry.model_copy(update={"table_i_row": "bone marrow"}) if entry.key == "roi-blood"
        else entry
        for entry in data.catalog.subdatasets
    ]  # fmt: skip
    catalog = Catalog(path=data.catalog.path, subdatasets=tuple(moved))
    load_manifest(data.layout, catalog)
    with open_manifest(data.layout) as con:
        rows = {row["organ"]: row for row in table_i(con).to_dicts()}
        by_organ = count_tiles(con, TileFilter(organs=("blood",)), by=())
    assert rows["bone marrow"]["sub-datasets"] == 1 and rows["bone marrow"]["ROIs-S"] == 4
    assert rows["blood"]["sub-datasets"] == 0 and rows["blood"]["ROIs-S"] == 0
    assert by_organ.item() == 4


def test_cpia_datasets_lists_each_sets_facts(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = build_data_folder(tmp_path / "data")
    about = About(licence="CC BY-NC-SA 4.0", redistributable=False, stain="H&E",
                  diseases=("breast cancer", "lymph node metastasis"),
                  pathology="histopathology", year=2017, landing_page="https://example.org/x",
                  citation="Someone et al., 2017")  # fmt: skip
    entries = tuple(
        entry.model_copy(update={"about": about}) if entry.key == "wsi-breast" else entry
        for entry in data.catalog.subdatasets
    )
    load_manifest(data.layout, Catalog(path=data.catalog.path, subdatasets=entries))
    code, out = run(capsys, data, "datasets", "--organ", "breast", "--markdown")
    assert code == 0
    header, _, row = out.splitlines()
    assert header.startswith("| key | name | kind | organ | table_i_row | labelled | licence |")
    assert row == (
        "| wsi-breast | WSI-BREAST | wsi | breast | breast | False | CC BY-NC-SA 4.0 | False | H&E "
        "| breast cancer; lymph node metastasis | histopathology | 2017 | https://example.org/x "
        "| Someone et al., 2017 |"
    )
    code, out = run(capsys, data, "datasets", "--kind", "roi", "--markdown")
    assert code == 0 and out.splitlines()[2].startswith("| roi-blood |")
    assert "| unknown |  | unknown |" in out  # licence unknown, redistributable unknown (null)
