"""raw_download sources against a real HTTP server on 127.0.0.1 (cpia_assets_tests/http_server)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cpia_assets.core import schema
from cpia_assets.core.catalog.fields import CatalogError
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.sources import SourceSpecError, validate_source
from cpia_assets.core.downloads import (
    DownloadSettings,
    ManualDownloadRequired,
    SourceError,
    SourceIncomplete,
    fetch_source,
    source_data_version,
)
from cpia_assets.core.downloads.paths import PARTIAL_DIR, STATE_FILE
from cpia_assets_tests.support.http_server import (
    FakeServer,
    png_bytes,
    write_server_catalog,
    zip_bytes,
)
from cpia_assets_tests.support.paths import TESTDATA

FAST = DownloadSettings(
    concurrency=2, timeout_s=5, retries=3, backoff_s=0.01, max_backoff_s=0.02, chunk_bytes=4096
)
SLIDE = TESTDATA / "CMU-1-Small-Region.svs"
TOKEN = "s3cr3t-token-value"


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as running:
        yield running


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


def http_spec(*files: dict[str, Any]) -> dict[str, Any]:
    return {"type": "http", "files": list(files)}


def fetch(spec: dict[str, Any], dest: Path, **kwargs: Any) -> list[dict[str, Any]]:
    settings = kwargs.pop("settings", FAST)
    return fetch_source(spec, dest, settings=settings, **kwargs)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- http: plain files, resume, retries, verification --------------------------------------


def test_http_files_are_verified_and_recorded(server: FakeServer, tmp_path: Path) -> None:
    first, second = payload(50_000), payload(20_000, seed=3)
    url_a = server.serve("/files/a.bin", first)
    url_b = server.serve("/files/deep/b.bin", second)
    spec = http_spec(
        {"url": url_a, "sha256": sha256(first), "size": len(first)},
        {"url": url_b, "md5": md5(second), "path": "sub/b-renamed.bin"},
    )
    messages: list[str] = []
    rows = fetch(spec, tmp_path / "raw", progress=messages.append)

    assert [r["rel_path"] for r in rows] == ["a.bin", "sub/b-renamed.bin"]
    assert (tmp_path / "raw" / "a.bin").read_bytes() == first
    assert (tmp_path / "raw" / "sub/b-renamed.bin").read_bytes() == second
    assert [r["sha256"] for r in rows] == [sha256(first), sha256(second)]
    assert [r["bytes"] for r in rows] == [50_000, 20_000]
    assert [r["source"] for r in rows] == [url_a, url_b]
    assert all(r["fetched_at"].tzinfo is not None for r in rows)
    assert schema.frame(rows, schema.RAW_FILES).schema == pl.Schema(schema.RAW_FILES)
    assert files_under(tmp_path / "raw") == [STATE_FILE, "a.bin", "sub/b-renamed.bin"]
    assert any("a.bin: downloading" in m for m in messages)
    assert any("a.bin: done, verified" in m for m in messages)


def test_rerun_makes_no_request_and_returns_the_same_rows(
    server: FakeServer, tmp_path: Path
) -> None:
    data = payload(10_000)
    spec = http_spec({"url": server.serve("/files/a.bin", data), "sha256": sha256(data)})
    first = fetch(spec, tmp_path)
    before = len(server.requests)
    second = fetch(spec, tmp_path)
    assert len(server.requests) == before
    assert second == first  # fetched_at included: the file was not fetched again


def test_a_dropped_connection_resumes_with_a_range_request(
    server: FakeServer, tmp_path: Path
) -> None:
    data = payload(120_000)
    url = server.serve("/files/big.bin", data, drop_first=2, drop_after=30_000)
    messages: list[str] = []
    rows = fetch(
        http_spec({"url": url, "sha256": sha256(data)}), tmp_path, progress=messages.append
    )
    assert (tmp_path / "big.bin").read_bytes() == data
    assert rows[0]["sha256"] == sha256(data)
    ranges = [r.headers.get("Range") for r in server.requests if r.path == "/files/big.bin"]
    assert ranges == [None, "bytes=30000-", "bytes=60000-"]
    assert any("resuming at byte 30000" in m for m in messages)
    assert any("connection dropped after 30000 of 120000 bytes" in m for m in messages)


def test_a_stalled_transfer_times_out_and_resumes(server: FakeServer, tmp_path: Path) -> None:
    data = payload(50_000)
    url = server.serve("/files/slow.bin", data, stall_first=1, drop_after=20_000, stall_s=1.0)
    messages: list[str] = []
    settings = replace(FAST, timeout_s=0.3)
    spec = http_spec({"url": url, "md5": md5(data)})
    fetch(spec, tmp_path, settings=settings, progress=messages.append)
    assert (tmp_path / "slow.bin").read_bytes() == data
    first, second = [r.headers.get("Range") for r in server.requests if r.path == "/files/slow.bin"]
    # Resumes after the whole chunks it kept; a chunk cut by the timeout is asked for again.
    assert first is None and 0 < int(second.removeprefix("bytes=").rstrip("-")) <= 20_000
    assert any("timed out" in m for m in messages)


def test_a_server_that_ignores_range_is_read_again_from_the_start(
    server: FakeServer, tmp_path: Path
) -> None:
    data = payload(40_000)
    url = server.serve("/files/x.bin", data, drop_first=1, drop_after=10_000, ranges=False)
    fetch(http_spec({"url": url, "md5": md5(data)}), tmp_path)
    assert (tmp_path / "x.bin").read_bytes() == data
    assert server.hits("/files/x.bin") == 2


def test_server_errors_are_retried_until_success(server: FakeServer, tmp_path: Path) -> None:
    data = payload(5_000)
    url = server.serve("/files/flaky.bin", data, fail_first=2, status=503)
    fetch(http_spec({"url": url, "sha256": sha256(data)}), tmp_path)
    assert (tmp_path / "flaky.bin").read_bytes() == data
    assert server.hits("/files/flaky.bin") == 3


def test_a_failing_file_fails_the_source_after_its_siblings_finish(
    server: FakeServer, tmp_path: Path
) -> None:
    good, bad = payload(8_000), payload(9_000, seed=1)
    spec = http_spec(
        {"url": server.serve("/files/good.bin", good), "sha256": sha256(good)},
        {"url": server.serve("/files/bad.bin", bad, fail_first=99), "sha256": sha256(bad)},
        {"url": server.serve("/files/gone.bin", b"x"), "path": "gone.bin", "md5": md5(b"y")},
    )
    with pytest.raises(SourceIncomplete) as caught:
        fetch(spec, tmp_path)
    error = caught.value
    reasons = {f["file"]: f["reason"] for f in error.failures}
    assert set(reasons) == {"bad.bin", "gone.bin"}
    assert "gave up after 3 retries" in reasons["bad.bin"] and "HTTP 500" in reasons["bad.bin"]
    assert "md5 is" in reasons["gone.bin"] and "download deleted" in reasons["gone.bin"]
    assert all(f["stage"] == "raw_download" for f in error.failures)
    assert [row["rel_path"] for row in error.rows] == ["good.bin"]
    assert "2 of 3 files failed" in str(error) and "bad.bin" in str(error)
    assert server.hits("/files/bad.bin") == 4  # first try + 3 retries
    assert (tmp_path / "good.bin").read_bytes() == good
    assert not (tmp_path / "gone.bin").exists()

    server.files["/files/bad.bin"].fail_first = 0  # the server recovers
    good_requests = server.hits("/files/good.bin")
    spec["files"].pop()
    rows = fetch(spec, tmp_path)
    assert [r["rel_path"] for r in rows] == ["bad.bin", "good.bin"]
    assert server.hits("/files/good.bin") == good_requests
    assert not (tmp_path / PARTIAL_DIR).exists()


def test_a_wrong_checksum_deletes_the_download(server: FakeServer, tmp_path: Path) -> None:
    data = payload(30_000)
    spec = http_spec({"url": server.serve("/files/a.bin", data), "sha256": sha256(b"other")})
    with pytest.raises(SourceIncomplete) as caught:
        fetch(spec, tmp_path)
    (failed,) = caught.value.failures
    assert failed["file"] == "a.bin"
    assert f"sha256 is {sha256(data)}, expected {sha256(b'other')}" in failed["reason"]
    assert files_under(tmp_path) == [STATE_FILE]


def test_a_wrong_size_fails_the_file(server: FakeServer, tmp_path: Path) -> None:
    data = payload(3_000)
    spec = http_spec({"url": server.serve("/f", data), "sha256": sha256(data), "size": 2_999})
    with pytest.raises(SourceIncomplete, match=r"f: size is 3000 bytes, expected 2999"):
        fetch(spec, tmp_path)


def test_not_found_is_not_retried(server: FakeServer, tmp_path: Path) -> None:
    spec = http_spec({"url": server.url + "/files/missing.bin", "md5": md5(b"")})
    with pytest.raises(SourceIncomplete, match=r"missing.bin: HTTP 404 from http://127.0.0.1"):
        fetch(spec, tmp_path)
    assert server.hits("/files/missing.bin") == 1


def test_a_file_already_on_disk_with_the_right_checksum_is_adopted(
    server: FakeServer, tmp_path: Path
) -> None:
    data = payload(2_000)
    (tmp_path / "a.bin").write_bytes(data)
    rows = fetch(http_spec({"url": server.serve("/a.bin", data), "sha256": sha256(data)}), tmp_path)
    assert rows[0]["sha256"] == sha256(data)
    assert server.hits("/a.bin") == 0


def test_files_dropped_from_the_source_are_removed(server: FakeServer, tmp_path: Path) -> None:
    one, two = payload(100), payload(200)
    first = {"url": server.serve("/d/one.bin", one), "sha256": sha256(one)}
    second = {"url": server.serve("/d/sub/two.bin", two), "sha256": sha256(two), "path": "s/t"}
    fetch(http_spec(first, second), tmp_path)
    rows = fetch(http_spec(first), tmp_path)
    assert [r["rel_path"] for r in rows] == ["one.bin"]
    assert files_under(tmp_path) == [STATE_FILE, "one.bin"]
    assert not (tmp_path / "s").exists()


# --- APIs: GDC, Zenodo, figshare, IDC ------------------------------------------------------


def test_gdc_project_pages_filters_and_verifies(server: FakeServer, tmp_path: Path) -> None:
    slide = SLIDE.read_bytes()
    server.add_gdc_slide("TCGA-TST", "TCGA-A1-DX1.svs", slide)
    server.add_gdc_slide("TCGA-TST", "TCGA-A2-DX1.svs", payload(7_000))
    server.add_gdc_slide("TCGA-TST", "TCGA-A3-TS1.svs", payload(6_000), strategy="Tissue Slide")
    server.add_gdc_slide("TCGA-TST", "TCGA-A4-DX1.svs", payload(500), md5="0" * 32)
    server.add_gdc_slide("TCGA-OTHER", "TCGA-B1-DX1.svs", payload(10))
    spec = {
        "type": "gdc",
        "project_id": "TCGA-TST",
        "experimental_strategies": ["Diagnostic Slide"],
        "api_url": server.gdc_api,
    }
    settings = replace(FAST, page_size=2)
    with pytest.raises(SourceIncomplete) as caught:
        fetch(spec, tmp_path, settings=settings)
    (failed,) = caught.value.failures
    assert failed["file"] == "TCGA-A4-DX1.svs" and f"expected {'0' * 32}" in failed["reason"]
    assert server.hits("/gdc/files", "POST") == 2  # two pages of two hits
    assert files_under(tmp_path) == [STATE_FILE, "TCGA-A1-DX1.svs", "TCGA-A2-DX1.svs"]
    assert (tmp_path / "TCGA-A1-DX1.svs").read_bytes() == slide
    rows = {r["rel_path"]: r for r in caught.value.rows}
    assert rows["TCGA-A1-DX1.svs"]["sha256"] == sha256(slide)
    assert rows["TCGA-A1-DX1.svs"]["source"].startswith(server.gdc_api + "/data/")


def test_gdc_rerun_reuses_the_saved_listing(server: FakeServer, tmp_path: Path) -> None:
    server.add_gdc_slide("TCGA-TST", "s1.svs", payload(100))
    spec = {"type": "gdc", "project_id": "TCGA-TST", "api_url": server.gdc_api}
    fetch(spec, tmp_path)
    before = len(server.requests)
    fetch(spec, tmp_path)
    assert len(server.requests) == before
    refreshed = replace(FAST, refresh_listings=True)
    fetch(spec, tmp_path, settings=refreshed)
    assert server.hits("/gdc/files", "POST") == 2


def test_gdc_token_comes_from_the_environment_and_is_never_kept(
    server: FakeServer, tmp_path: Path
) -> None:
    server.gdc_token = TOKEN
    file_id = server.add_gdc_slide("TCGA-TST", "s1.svs", payload(300))
    server.add_gdc_slide("TCGA-TST", "s2.svs", payload(400))
    server.serve("/storage/s2.svs", payload(400))
    server.files[f"/gdc/data/{server.api.gdc_files[1]['file_id']}"].redirect_to = "/storage/s2.svs"
    spec = {
        "type": "gdc",
        "project_id": "TCGA-TST",
        "api_url": server.gdc_api,
        "token_env": "GDC_TOKEN",
    }
    messages: list[str] = []
    rows = fetch(spec, tmp_path, env={"GDC_TOKEN": TOKEN}, progress=messages.append)

    assert len(rows) == 2
    sent = {r.path: r.headers.get("X-Auth-Token") for r in server.requests}
    assert sent[f"/gdc/data/{file_id}"] == TOKEN
    assert sent["/storage/s2.svs"] is None  # never forwarded to a redirect target
    kept = (tmp_path / STATE_FILE).read_text() + json.dumps(rows, default=str) + "".join(messages)
    assert TOKEN not in kept


def test_gdc_without_its_token_explains_what_to_set(server: FakeServer, tmp_path: Path) -> None:
    server.gdc_token = TOKEN
    server.add_gdc_slide("TCGA-TST", "s1.svs", payload(300))
    spec = {"type": "gdc", "project_id": "TCGA-TST", "api_url": server.gdc_api, "token_env": "T"}
    with pytest.raises(SourceIncomplete) as caught:
        fetch(spec, tmp_path, env={})
    assert "HTTP 403" in str(caught.value)
    assert "set the variable named by the source's token_env" in str(caught.value)


def test_gdc_project_without_slides_is_a_listing_error(server: FakeServer, tmp_path: Path) -> None:
    spec = {"type": "gdc", "project_id": "TCGA-NONE", "api_url": server.gdc_api}
    with pytest.raises(SourceError, match="no slide images found"):
        fetch(spec, tmp_path)


def test_zenodo_archives_are_extracted_and_recorded(server: FakeServer, tmp_path: Path) -> None:
    images = {f"train/tumour/t{i}.png": png_bytes(i) for i in range(3)}
    archive = zip_bytes(images)
    server.add_zenodo_record(77, {"tiles.zip": archive, "readme.txt": b"hello", "x.csv": b"1"})
    spec = {"type": "zenodo", "record": 77, "files": ["tiles.zip", "readme.txt"]}
    spec["api_url"] = server.zenodo_api
    rows = fetch(spec, tmp_path)

    paths = [r["rel_path"] for r in rows]
    assert paths == ["readme.txt", *(f"tiles/{name}" for name in sorted(images))]
    for name, data in images.items():
        assert (tmp_path / "tiles" / name).read_bytes() == data
    by_path = {r["rel_path"]: r for r in rows}
    member = by_path["tiles/train/tumour/t0.png"]
    assert member["sha256"] == sha256(images["train/tumour/t0.png"])
    assert member["source"].endswith("/records/77/files/tiles.zip/content!/train/tumour/t0.png")
    assert files_under(tmp_path) == [STATE_FILE, *paths]  # the archive itself is not kept

    before = len(server.requests)
    assert fetch(spec, tmp_path) == rows
    assert len(server.requests) == before


def test_kept_archives_are_not_downloaded_again_after_members_vanish(
    server: FakeServer, tmp_path: Path
) -> None:
    archive = zip_bytes({"a/one.png": png_bytes(1)})
    server.add_zenodo_record(78, {"set.zip": archive})
    spec = {"type": "zenodo", "record": 78, "api_url": server.zenodo_api}
    settings = replace(FAST, keep_archives=True)
    rows = fetch(spec, tmp_path, settings=settings)
    assert [r["rel_path"] for r in rows] == ["set/a/one.png"]
    assert (tmp_path / ".cpia_archives" / "set.zip").read_bytes() == archive

    (tmp_path / "set/a/one.png").unlink()
    again = fetch(spec, tmp_path, settings=settings)
    assert [r["rel_path"] for r in again] == ["set/a/one.png"]
    assert server.hits("/zenodo/records/78/files/set.zip/content") == 1


def test_zenodo_missing_record_and_missing_file_are_clear(
    server: FakeServer, tmp_path: Path
) -> None:
    server.add_zenodo_record(5, {"a.txt": b"a"})
    with pytest.raises(SourceError, match=r"Zenodo record 6 .*HTTP 404"):
        fetch({"type": "zenodo", "record": 6, "api_url": server.zenodo_api}, tmp_path)
    spec = {"type": "zenodo", "record": 5, "api_url": server.zenodo_api, "files": ["b.txt"]}
    with pytest.raises(SourceError, match=r"has no file\(s\) \['b.txt'\]; it has \['a.txt'\]"):
        fetch(spec, tmp_path)


def test_figshare_article_files(server: FakeServer, tmp_path: Path) -> None:
    server.add_figshare_article(9, {"images.tar.gz": _tar_gz({"x/1.txt": b"one"}), "n.txt": b"n"})
    rows = fetch({"type": "figshare", "article": 9, "api_url": server.figshare_api}, tmp_path)
    assert [r["rel_path"] for r in rows] == ["images/x/1.txt", "n.txt"]
    assert (tmp_path / "images/x/1.txt").read_bytes() == b"one"


def test_idc_collection_pages_and_etag_check(server: FakeServer, tmp_path: Path) -> None:
    series = server.add_idc_series("cptac_tst", [payload(900), payload(800, 1)])
    other = server.add_idc_series("cptac_tst", [payload(700, 2)])
    server.add_idc_series("cptac_tst", [payload(10)], modality="CT")
    server.add_idc_series("cptac_else", [payload(10)])
    spec = {
        "type": "idc",
        "collection_id": "cptac_tst",
        "api_url": server.idc_api,
        "storage_url": server.storage_url,
    }
    rows = fetch(spec, tmp_path)
    assert server.hits("/idc/cohorts/manifest/preview/nextPage") == 1  # 3 rows, pages of 2
    assert sorted({r["rel_path"].split("/")[0] for r in rows}) == sorted([series, other])
    assert all(r["rel_path"].endswith(".dcm") for r in rows) and len(rows) == 3

    broken = server.add_idc_series("cptac_bad", [payload(50)])
    key = next(p for p in server.files if broken in p)
    server.files[key].etag = '"' + "f" * 32 + '"'
    spec["collection_id"] = "cptac_bad"
    with pytest.raises(SourceIncomplete, match=f"md5 is {md5(payload(50))}, expected f+"):
        fetch(spec, tmp_path / "bad")


# --- manual, local, synthetic --------------------------------------------------------------


def test_manual_source_asks_for_files_then_records_them(tmp_path: Path) -> None:
    dest = tmp_path / "raw" / "paip2019"
    spec = {
        "type": "manual",
        "landing_page": "https://paip2019.grand-challenge.org/",
        "instructions": "Register and download the slides.",
    }
    with pytest.raises(ManualDownloadRequired) as caught:
        fetch(spec, dest)
    message = str(caught.value)
    assert "https://paip2019.grand-challenge.org/" in message
    assert str(dest) in message and "Register and download the slides" in message
    assert dest.is_dir()

    (dest / "slides").mkdir()
    (dest / "slides" / "a.svs").write_bytes(b"slide-a")
    (dest / ".DS_Store").write_bytes(b"finder clutter")
    rows = fetch(spec, dest)
    assert [(r["rel_path"], r["sha256"]) for r in rows] == [("slides/a.svs", sha256(b"slide-a"))]
    assert rows[0]["source"] == "https://paip2019.grand-challenge.org/"
    assert fetch(spec, dest) == rows


@pytest.mark.parametrize("mode", ["symlink", "copy", "hardlink"])
def test_local_folder_is_linked_or_copied(tmp_path: Path, mode: str) -> None:
    origin = tmp_path / "mine"
    (origin / "sub").mkdir(parents=True)
    (origin / "a.png").write_bytes(b"aaa")
    (origin / "sub" / "b.png").write_bytes(b"bbbb")
    (origin / ".hidden").write_bytes(b"no")
    dest = tmp_path / "raw"
    rows = fetch({"type": "local", "path": str(origin), "mode": mode}, dest)

    assert [(r["rel_path"], r["bytes"]) for r in rows] == [("a.png", 3), ("sub/b.png", 4)]
    assert (dest / "sub" / "b.png").read_bytes() == b"bbbb"
    assert (dest / "a.png").is_symlink() == (mode == "symlink")
    assert fetch({"type": "local", "path": str(origin), "mode": mode}, dest) == rows

    if mode != "hardlink":  # a hard link shares the changed bytes; the others must notice
        (origin / "a.png").write_bytes(b"changed")
        os.utime(origin / "a.png", ns=(1, 1))
        changed = fetch({"type": "local", "path": str(origin), "mode": mode}, dest)
        assert changed[0]["sha256"] == sha256(b"changed")
        assert (dest / "a.png").read_bytes() == b"changed"


def test_local_glob_and_missing_folder(tmp_path: Path) -> None:
    for name in ("x.svs", "y.svs", "z.txt"):
        (tmp_path / "in" / "d").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "d" / name).write_bytes(name.encode())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.svs").write_bytes(b"w")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "elsewhere")
    rows = fetch({"type": "local", "path": str(tmp_path / "in" / "**" / "*.svs")}, tmp_path / "o")
    assert [r["rel_path"] for r in rows] == ["d/x.svs", "d/y.svs", "linked/w.svs"]
    rows = fetch({"type": "local", "path": str(tmp_path / "in" / "*" / "[xz].*")}, tmp_path / "o")
    assert [r["rel_path"] for r in rows] == ["d/x.svs", "d/z.txt"]
    with pytest.raises(SourceError, match="no such folder"):
        fetch({"type": "local", "path": str(tmp_path / "nope")}, tmp_path / "o2")


def test_local_folder_links_are_followed_and_loops_refused_by_name(tmp_path: Path) -> None:
    origin, elsewhere = tmp_path / "mine", tmp_path / "elsewhere"
    (origin / "real").mkdir(parents=True)
    (elsewhere / "deep").mkdir(parents=True)
    (origin / "real" / "a.png").write_bytes(b"aaa")
    (elsewhere / "deep" / "b.png").write_bytes(b"bb")
    (origin / "linked").symlink_to(elsewhere)
    (elsewhere / "back").symlink_to(origin)  # origin/linked/back -> origin: a loop
    (origin / "gone.png").symlink_to(tmp_path / "missing.png")
    dest = tmp_path / "raw"
    with pytest.raises(SourceIncomplete) as caught:
        fetch({"type": "local", "path": str(origin)}, dest)
    assert sorted(r["rel_path"] for r in caught.value.rows) == ["linked/deep/b.png", "real/a.png"]
    assert (dest / "linked" / "deep" / "b.png").read_bytes() == b"bb"
    reasons = {f["file"]: f["reason"] for f in caught.value.failures}
    assert reasons == {
        "gone.png": f"broken link to {tmp_path / 'missing.png'}",
        "linked/back": "loops back to a folder above it; not followed",
    }
    (elsewhere / "back").unlink()
    (origin / "gone.png").unlink()
    rows = fetch({"type": "local", "path": str(origin)}, dest)
    assert [r["rel_path"] for r in rows] == ["linked/deep/b.png", "real/a.png"]


@pytest.mark.parametrize("kind", ["local", "manual"])
def test_a_name_that_is_not_utf8_fails_alone_and_shows_escaped(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "good.png").write_bytes(b"good")
    (folder / os.fsdecode(b"caf\xff.png")).write_bytes(b"bad name")
    if kind == "local":
        spec, dest = {"type": "local", "path": str(folder)}, tmp_path / "raw"
    else:
        spec, dest = {"type": "manual", "landing_page": "https://example.org/"}, folder
    with pytest.raises(
        SourceIncomplete, match=r"caf\\xff\.png: the name is not valid UTF-8"
    ) as caught:
        fetch(spec, dest)
    rows, failures = caught.value.rows, caught.value.failures
    assert [r["rel_path"] for r in rows] == ["good.png"]
    assert failures == [
        {
            "file": "caf\\xff.png",
            "stage": "raw_download",
            "reason": "the name is not valid UTF-8; rename it",
        }
    ]
    # Both tables can be written (the crash was a UnicodeEncodeError in the Parquet writer).
    schema.frame(rows, schema.RAW_FILES).write_parquet(tmp_path / "raw_files.parquet")
    schema.frame(failures, schema.FAILURES).write_parquet(tmp_path / "failures.parquet")
    assert pl.read_parquet(tmp_path / "failures.parquet")["file"].to_list() == ["caf\\xff.png"]


def test_synthetic_sources_are_generated_and_recorded(tmp_path: Path) -> None:
    spec = {
        "type": "synthetic",
        "recipe": "roi",
        "layout": "folders",
        "classes": ["a"],
        "per_split": {"train": 2},
        "seed": 3,
    }
    rows = fetch(spec, tmp_path)
    assert len(rows) == 2 and all(r["rel_path"].startswith("train/a/") for r in rows)
    assert rows[0]["sha256"] == sha256((tmp_path / rows[0]["rel_path"]).read_bytes())


# --- specs, catalog and data version -------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "ftp"}, "unknown source type 'ftp'"),
        ({"type": "http", "files": [{"url": "http://h/x"}]}, "needs 'sha256' or 'md5'"),
        ({"type": "http", "files": [{"url": "file:///etc/passwd", "md5": "0" * 32}]}, "http(s)"),
        ({"type": "http", "files": [{"url": "http://h/x", "md5": "xyz"}]}, "not a hex digest"),
        (
            {"type": "http", "files": [{"url": "https://h/x?access_token=abc", "md5": "0" * 32}]},
            "carries a credential",
        ),
        ({"type": "manual", "landing_page": "https://user:pw@h/"}, "carries a credential"),
        (
            {"type": "http", "files": [{"url": "http://h/x", "md5": "0" * 32, "path": "../x"}]},
            "climbs out",
        ),
        ({"type": "gdc"}, "source field 'project_id': required for a gdc source"),
        ({"type": "gdc", "project_id": "P", "token": "abc"}, "token_env"),
        (
            {"type": "gdc", "project_id": "P", "experimental_strategies": ["Bad"]},
            "subset of",
        ),
        ({"type": "zenodo", "record": "abc"}, "numeric id"),
        (
            {"type": "zenodo", "record": 1, "recrod": 2},
            "source field 'recrod': unknown field; did you mean 'record'?",
        ),
        (
            {"type": "manual", "landing_page": ""},
            "source field 'landing_page': required for a manual source",
        ),
        ({"type": "tcia", "collection": "CPTAC-BRCA"}, "use {type: idc"),
        ({"type": "local", "path": "/x", "mode": "move"}, "field 'mode': 'move' is not one of"),
        (
            {"type": "idc", "collection_id": "c", "token_env": "X"},
            "field 'token_env': unknown field",
        ),
        ({"type": "gdc", "project_id": "P", "token_env": "1X"}, "'1X' is not an environment"),
        # `$` would accept these: a trailing newline is not part of a digest or a name
        ({"type": "gdc", "project_id": "P", "token_env": "TOKEN\n"}, "not an environment"),
        (
            {"type": "http", "files": [{"url": "http://h/x", "md5": "0" * 32 + "\n"}]},
            "source field 'files[0].md5': '00000000000000000000000000000000\\n' is not a hex",
        ),
        (
            {"type": "http", "files": [{"url": "http://h/x", "sha265": "0" * 64}]},
            "source field 'files[0].sha265': unknown field; did you mean 'sha256'?",
        ),
    ],
)
def test_bad_specs_are_rejected_with_the_reason(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SourceSpecError) as caught:
        validate_source(spec)
    assert message in str(caught.value)


def test_the_catalog_reports_bad_sources_with_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "subdatasets:\n- {key: a, name: A, kind: wsi, organ: lung, "
        "source: {type: zenodo, record: 1, password: x}}\n"
    )
    with pytest.raises(CatalogError) as caught:
        load_catalog(path)
    assert str(caught.value) == (
        f"{path}: entry 'a' (#1): field 'source.password': would put a credential in the "
        "catalog; name the environment variable that holds it with 'token_env' instead"
    )


def test_full_catalog_sources() -> None:
    catalog = load_catalog("cpia")
    by_type: dict[str, list[str]] = {}
    for entry in catalog.subdatasets:
        by_type.setdefault(entry.source["type"], []).append(entry.key)
        if entry.key.startswith("tcga-"):
            assert entry.source == {
                "type": "gdc",
                "project_id": entry.key.upper(),
                "experimental_strategies": ["Diagnostic Slide", "Tissue Slide"],
            }
        if entry.source["type"] == "manual":
            assert entry.source["landing_page"].startswith(("https://", "http://"))
    assert len(catalog.subdatasets) == 103
    assert len(by_type["gdc"]) == 32
    cptac = ("aml", "brca", "ccrcc", "cm", "coad", "hnscc", "lscc", "luad", "ov", "pda", "sar")
    expected_idc = [f"cptac-{p}" for p in (*cptac, "ucec")] + ["cmb-crc", "cmb-lca", "cmb-mel"]
    assert sorted(by_type["idc"]) == sorted(expected_idc)
    zenodo = {e.key: e.source for e in catalog.subdatasets if e.source["type"] == "zenodo"}
    assert zenodo["nct-crc-he-100k"]["record"] == zenodo["crc-val-he-7k"]["record"] == 1214456


def test_data_version_depends_only_on_paths_and_checksums() -> None:
    rows = [
        {"rel_path": "a", "sha256": "1", "fetched_at": datetime.now(UTC)},
        {"rel_path": "b", "sha256": "2", "fetched_at": datetime.now(UTC)},
    ]
    same = [{**rows[1], "fetched_at": None}, {**rows[0], "bytes": 9}]
    assert source_data_version(rows) == source_data_version(same)
    assert source_data_version(rows) != source_data_version([rows[0], {**rows[1], "sha256": "3"}])


def test_server_catalog_helper_end_to_end(server: FakeServer, tmp_path: Path) -> None:
    catalog = load_catalog(write_server_catalog(tmp_path / "catalog.yaml", server))
    assert catalog.keys == ["srv-wsi", "srv-roi"]
    wsi = fetch(catalog.get("srv-wsi").source, tmp_path / "raw" / "srv-wsi")
    roi = fetch(catalog.get("srv-roi").source, tmp_path / "raw" / "srv-roi")
    assert [r["rel_path"] for r in wsi] == [SLIDE.name]
    assert len(roi) == 10 and all(r["rel_path"].startswith("cells/") for r in roi)
    assert {r["rel_path"].split("/")[1] for r in roi} == {"train", "val", "test"}


def _tar_gz(members: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
