"""`cpia lineage` on the small build (a Mini image and shard samples traced to their raw
files, whose bytes are hashed here) and `cpia plan` on the full catalog (published totals,
the disk and hours arithmetic), with their errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import duckdb
import pytest

from cpia_assets import cli
from cpia_assets.cli import main
from cpia_assets.core.fsutil import sha256_file
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training import plan as plan_core
from cpia_assets.core.wsi.measure import Measurement, measure_tiling
from cpia_assets_tests.support.paths import REFERENCE


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def manifest_rows(layout: DataLayout, sql: str) -> list[dict[str, Any]]:
    with duckdb.connect(str(layout.duckdb_path), read_only=True) as con:
        return con.sql(sql).pl().to_dicts()


def lineage_json(capsys: pytest.CaptureFixture[str], layout: DataLayout, *args: str) -> list:
    code, out, err = run(capsys, "--data-dir", str(layout.root), "lineage", *args, "--json")
    assert code == 0, err
    chains = json.loads(out)["chains"]
    assert len(chains) == 1
    return chains[0]


def check_source_end(layout: DataLayout, chain: list[dict], key: str, slide: str | None) -> None:
    """The chain ends in the raw file (hashed here) and the sub-dataset; WSI via the slide."""
    steps = [step["step"] for step in chain]
    source, entry = chain[-2], chain[-1]
    assert steps[-2:] == ["source file", "sub-dataset"]
    assert source["item"].startswith(f"raw/{key}/")
    raw = layout.root / source["item"]
    assert raw.is_file() and source["sha256"] == sha256_file(raw)
    assert source["details"]["bytes"] == raw.stat().st_size
    assert source["asset"] == "raw_download" and source["run_id"]
    assert entry["item"] == key and entry["details"]["kind"] in {"wsi", "roi"}
    if slide is not None:
        standardized = chain[-3]
        assert standardized["step"] == "standardized slide"
        assert standardized["item"] == f"standardized/{key}/{slide}.tiff"
        assert (layout.root / standardized["item"]).is_file()
        assert Path(source["item"]).stem == slide


def test_lineage_traces_a_mini_image_to_its_raw_file(
    capsys: pytest.CaptureFixture[str], small_build: dict
) -> None:
    layout = small_build["layout"]
    mini = manifest_rows(
        layout,
        "SELECT * FROM mini_images WHERE subdataset = 'wsi-40x' AND scale = 'L' "
        "ORDER BY image_name LIMIT 1",
    )[0]
    chain = lineage_json(capsys, layout, mini["path"])
    assert [step["step"] for step in chain] == [
        "Mini image", "L tile", "XL tile", "standardized slide", "source file", "sub-dataset",
    ]  # fmt: skip
    image, tile, xl = chain[:3]
    assert image["item"] == mini["path"] and (layout.root / image["item"]).is_file()
    assert image["details"]["size_px"] == 384 and image["details"]["resample"] == "area"
    assert tile["item"] == mini["source_path"] == f"cpia/L/wsi-40x/{mini['source_tile']}.jpg"
    slide, size, x, y = re.fullmatch(r"(.+)-(\d+)-(\d+)-(\d+)", mini["source_tile"]).groups()
    assert (size, tile["details"]["grid"]) == ("960", f"({x}, {y})")
    assert tile["details"]["pixels"].startswith(f"({960 * int(x)}, {960 * int(y)})")
    xl_x, xl_y = int(x) // 4, int(y) // 4  # an L tile lies in the XL tile at 1/4 its grid
    assert xl["item"] == f"cpia/L/wsi-40x/{slide}-3840-{xl_x}-{xl_y}.jpg"
    check_source_end(layout, chain, "wsi-40x", slide)
    # The same by name with --mini, and as text (the default).
    assert lineage_json(capsys, layout, mini["image_name"], "--mini") == chain
    code, out, _ = run(capsys, "--data-dir", str(layout.root), "lineage", mini["path"])
    assert code == 0
    firsts = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert firsts == ["Mini", "L", "XL", "standardized", "source", "sub-dataset"]
    assert chain[-2]["sha256"] in out and f"raw/wsi-40x/{slide}.tiff" in out


def test_lineage_traces_shard_samples_to_their_raw_files(
    capsys: pytest.CaptureFixture[str], small_build: dict
) -> None:
    layout = small_build["layout"]
    samples = manifest_rows(
        layout,
        f"SELECT * FROM read_parquet('{layout.shards_dir('cpia-s')}/samples.parquet') "
        "WHERE subdataset = 'wsi-20x' ORDER BY key LIMIT 1",
    )
    key = samples[0]["key"]
    chain = lineage_json(capsys, layout, key, "--export", "cpia-s")
    assert [step["step"] for step in chain] == [
        "shard sample", "S tile", "M tile", "XL tile", "standardized slide", "source file",
        "sub-dataset",
    ]  # fmt: skip
    sample, tile = chain[:2]
    assert sample["details"]["export"] == "cpia-s" and tile["item"] == samples[0]["path"]
    with tarfile.open(layout.root / sample["details"]["shard"]) as tar:
        member = tar.extractfile(f"{key}.jpg").read()
        names = [name for name in tar.getnames() if name.endswith(".jpg")]
    assert member == (layout.root / tile["item"]).read_bytes()
    assert names[sample["details"]["position in shard"]] == f"{key}.jpg"
    slide = tile["item"].split("/")[-1].rsplit("-", 3)[0]
    check_source_end(layout, chain, "wsi-20x", slide)

    # A cpia-mini sample of a labelled ROI set (a linked image) and one of a WSI Mini image;
    # without --export every export is searched.
    mini_samples = manifest_rows(
        layout,
        f"SELECT * FROM read_parquet('{layout.shards_dir('cpia-mini')}/samples.parquet') "
        "ORDER BY key",
    )
    roi = next(row for row in mini_samples if row["subdataset"] == "roi-cells")
    chain = lineage_json(capsys, layout, roi["key"])
    assert [step["step"] for step in chain] == [
        "shard sample", "Mini image", "ROI image (S)", "source file", "sub-dataset",
    ]  # fmt: skip
    assert chain[2]["details"]["split"] == "train"  # only train images enter Mini
    check_source_end(layout, chain, "roi-cells", None)
    wsi = next(row for row in mini_samples if row["subdataset"] == "wsi-40x" and
               row["scale"] == "M")  # fmt: skip
    chain = lineage_json(capsys, layout, wsi["key"], "--export", "cpia-mini")
    assert [step["step"] for step in chain][:4] == ["shard sample", "Mini image", "M tile",
                                                     "XL tile"]  # fmt: skip
    check_source_end(layout, chain, "wsi-40x", chain[2]["item"].split("/")[-1].rsplit("-", 3)[0])


def test_lineage_errors_name_what_was_not_found(
    capsys: pytest.CaptureFixture[str], small_build: dict, tmp_path: Path
) -> None:
    root = str(small_build["layout"].root)
    for args, message in [
        (["wsi-40x__S__nope", "--export", "cpia-s"],
         "no sample with key 'wsi-40x__S__nope' in export 'cpia-s'"),
        (["wsi-40x__S__nope", "--export", "cpia-m"],
         f"export 'cpia-m': {root}/shards/cpia-m/samples.parquet does not exist"),
        (["nope"], "no kept image named 'nope' in the manifest (nor a Mini image)"),
        (["cpia-mini/L/wsi-40x/nope.jpg"],
         "no kept image or Mini image with path 'cpia-mini/L/wsi-40x/nope.jpg'"),
    ]:  # fmt: skip
        code, out, err = run(capsys, "--data-dir", root, "lineage", *args)
        assert (code, out) == (2, "") and err.startswith(f"cpia: {message}"), err
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "lineage", "x")
    assert code == 2
    assert err == (f"cpia: {tmp_path}/manifest.duckdb does not exist yet: materialize the "
                   "tile_manifest asset first\n")  # fmt: skip


def test_lineage_says_when_the_writer_holds_the_manifest(
    capsys: pytest.CaptureFixture[str],
    small_build: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = tmp_path / "manifest.duckdb"
    shutil.copyfile(small_build["layout"].duckdb_path, database)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
         "print('locked', flush=True); sys.stdin.read()", str(database)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(cli, "MANIFEST_WAIT_S", 0.3)
        code, out, err = run(capsys, "--data-dir", str(tmp_path), "lineage", "x")
    finally:
        holder.communicate("")
    assert (code, out) == (2, "")
    assert f"process {holder.pid}" in err and "(tile_manifest is writing it)" in err
    assert f"cpia: {database}: could not open for reading within 0 s" in err


# --- plan --------------------------------------------------------------------------------------

SPREADSHEET = {"XL": 736_719, "L": 11_245_935 + 287_541, "M": 68_844_269 + 670_777 + 1_417,
               "S": 66_978_086 + 199_259}  # fmt: skip
"""Published images per scale (CPIA_details.xlsx, cpia_repo_notes.md: WSI XL, L, M, S and the
ROI sheets L, M, S) plus pRCC's 1,417 M images (the paper), which cpia.yaml adds as its 103rd
sub-dataset: 148,964,003 in all."""


def csv_totals() -> dict[str, int]:
    """Images per scale summed over `cpia_subdatasets.csv` (its notes give WSI counts per size
    and the scales of ROI sets split across scales)."""
    totals = dict.fromkeys(("XL", "L", "M", "S"), 0)
    with (REFERENCE / "cpia_subdatasets.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["kind"] == "WSI":
                for scale, count in re.findall(r"\b(XL|L|M|S)\(\d+px\)=(\d+)", row["notes"]):
                    totals[scale] += int(count)
            elif ";" in row["scales"]:
                for scale, count in re.findall(r"\[(L|M|S)\]=(\d+)", row["notes"]):
                    totals[scale] += int(count)
            else:
                totals[row["scales"]] += int(row["n_images"])
    return totals


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run(capsys, "plan", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_plan_of_the_full_catalog_expects_the_published_counts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CPIA_CATALOG", raising=False)
    plan = plan_json(capsys, "--throughput", "2")
    assert len(plan["subdatasets"]) == 103 and plan["catalog"].endswith("cpia.yaml")
    total = plan["total"]
    assert total["images"] == SPREADSHEET and total["total_images"] == 148_964_003
    if (REFERENCE / "cpia_subdatasets.csv").is_file():
        with_prcc = csv_totals()
        with_prcc["M"] += 1_417
        assert total["images"] == with_prcc
    rows = plan["subdatasets"]
    for scale in SPREADSHEET:
        assert sum(row["images"][scale] for row in rows) == total["images"][scale]
    brca = next(row for row in rows if row["subdataset"] == "tcga-brca")
    assert brca["images"] == {"XL": 45_956, "L": 695_826, "M": 4_250_479, "S": 4_118_589}  # csv
    # Mini: the quota arithmetic of the README (28,242 XL tiles); CAM16 is held out.
    assert total["mini_images"]["XL"] == 28_242
    assert next(row for row in rows if row["subdataset"] == "cam16")["mini_images"]["XL"] == 0
    assert plan["raw_unknown"] == [row["subdataset"] for row in rows]  # no sizes in cpia.yaml
    assert total["raw_bytes"] is None


def test_plan_disk_and_hours_follow_from_counts_sizes_and_throughput(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPIA_CATALOG", "cpia")
    slow, fast = plan_json(capsys, "--throughput", "1.5"), plan_json(capsys, "--throughput", "3")
    sizes = slow["sizes"]
    assert slow["throughput"] == {"xl_tiles_per_second": 1.5, "source": "given (--throughput)"}
    xl = slow["total"]["images"]["XL"]
    assert slow["total"]["hours"] == pytest.approx(xl / 1.5 / 3600)
    assert fast["total"]["hours"] == pytest.approx(slow["total"]["hours"] / 2)
    for row in slow["subdatasets"]:
        images = row["images"]
        if row["kind"] == "wsi":
            assert row["hours"] == pytest.approx(images["XL"] / 1.5 / 3600)
            assert row["tiff_bytes"] == images["XL"] * sizes["tiff_bytes_per_xl"]
            assert row["tile_bytes"] == sum(n * sizes["tile_bytes"][s] for s, n in images.items())
            mini = row["mini_images"]
            assert row["mini_bytes"] == sum(n * sizes["mini_bytes"][s] for s, n in mini.items())
            assert mini["S"] == mini["M"] <= 32 * mini["XL"] and mini["L"] <= 16 * mini["XL"]
        else:
            assert row["hours"] is None and row["tiff_bytes"] == 0 and row["mini_bytes"] == 0
            assert row["tile_bytes"] == row["total_images"] * sizes["roi_bytes"]
        assert row["disk_bytes"] == (row["tiff_bytes"] + row["tile_bytes"] + row["mini_bytes"]
                                     + sum(row["shard_bytes"].values()))  # fmt: skip
    for name in ("tiff_bytes", "tile_bytes", "mini_bytes", "disk_bytes"):
        assert slow["total"][name] == sum(row[name] for row in slow["subdatasets"])
    assert plan_core.human_bytes(slow["total"]["tile_bytes"]).endswith(" TB")


def test_plan_table_and_catalog_selection(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CPIA_CATALOG", "demo")
    code, out, _ = run(capsys, "plan", "--throughput", "1.6")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["subdataset", "kind", "XL", "L", "M", "S"]
    assert {line.split()[0] for line in lines[1:5]} == {
        "demo-wsi-40x", "demo-wsi-20x", "demo-roi-tissue", "demo-roi-cells"}  # fmt: skip
    assert lines[5].startswith("total") and "hours: WSI tiling at 1.6 XL tiles/s" in out
    plan = plan_json(capsys, "--catalog", "cpia")  # the option wins over CPIA_CATALOG
    assert len(plan["subdatasets"]) == 103 and plan["total"]["hours"] is None
    code, out, _ = run(capsys, "plan", "--catalog", "cpia", "--markdown")
    total = out.splitlines()[105]
    assert total.startswith("| total |  | 736,719 |") and "148,964,003" in total
    code, _, err = run(capsys, "plan", "--catalog", str(tmp_path / "none.yaml"))
    assert code == 2 and f"catalog file {tmp_path / 'none.yaml'} does not exist" in err
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--throughput", "0"])
    assert exit_.value.code == 2
    assert "argument --throughput: must be a positive number, got '0'" in capsys.readouterr().err


def test_plan_measure_times_the_real_tiling_core(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    found = measure_tiling(xl_per_edge=1, workers=1, work_dir=tmp_path)
    assert (found.xl_tiles, found.slides, found.workers) == (1, 1, 1)
    assert found.seconds > 0 and found.xl_per_second == 1 / found.seconds
    tiles = list((tmp_path / "data" / "cpia").rglob("*.jpg"))
    assert len([t for t in tiles if "-3840-" in t.name]) == 1 and len(tiles) > 100
    # The CLI uses what the measurement found.
    monkeypatch.setattr(
        "cpia_assets.core.wsi.measure.measure_tiling",
        lambda workers=None: Measurement(10.0, 20, 2, workers or 2, 480.0),
    )
    plan = plan_json(capsys, "--catalog", "demo", "--measure", "--workers", "2")
    assert plan["throughput"]["xl_tiles_per_second"] == 2.0
    assert plan["throughput"]["source"].startswith("measured here: 20 XL tiles of 2 synthetic")


def test_plan_raw_sizes_come_from_the_catalog_or_are_unknown(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.yaml"
    sha = "0" * 64
    catalog.write_text(f"""\
subdatasets:
- key: sized
  name: Sized
  kind: roi
  organ: blood
  scale: S
  published_counts: {{S: 1000}}
  source: {{type: http, files: [{{url: "https://example.org/a.zip", sha256: "{sha}", size: 700}},
                                {{url: "https://example.org/b.zip", sha256: "{sha}", size: 300}}]}}
- key: unsized
  name: Unsized
  kind: wsi
  organ: lung
  source: {{type: http, files: [{{url: "https://example.org/c.svs", sha256: "{sha}"}}]}}
""")
    plan = plan_json(capsys, "--catalog", str(catalog))
    sized, unsized = plan["subdatasets"]
    assert sized["raw_bytes"] == 1000 and unsized["raw_bytes"] is None
    assert sized["disk_bytes"] == 1000 + 1000 * plan["sizes"]["roi_bytes"] + sum(
        sized["shard_bytes"].values()
    )
    assert (plan["raw_unknown"], plan["no_published_counts"]) == (["unsized"], ["unsized"])
    assert unsized["mini_images"] == {"XL": 0, "L": 0, "M": 0, "S": 0}  # nothing published
    code, out, _ = run(capsys, "plan", "--catalog", str(catalog))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line}
    assert "1.0 KB" in rows["sized"] and ">=" not in rows["sized"] and ">=" in rows["total"]
    assert "no published counts in the catalog for 1 sub-datasets (unsized)" in out
