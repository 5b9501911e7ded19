"""Safe archive extraction: malicious zips and tars are refused and write nothing anywhere."""

from __future__ import annotations

import gzip
import hashlib
import io
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpia_assets.core.downloads import (
    DownloadSettings,
    FileFetchError,
    SourceIncomplete,
    UnsafeArchiveError,
    fetch_source,
)
from cpia_assets.core.downloads.archives import archive_stem, extract_archive
from cpia_assets.core.downloads.paths import STATE_FILE
from cpia_assets_tests.support.http_server import FakeServer, zip_bytes

MIB = 1 << 20


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as running:
        yield running


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None], mode: str = "w:gz") -> bytes:
    """The archive's bytes; gzip with a fixed mtime, so that they (and the test ids made from
    them) are the same in every process: pytest-xdist workers must collect identical ids."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode.removesuffix(":gz")) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(buffer.getvalue(), mtime=0) if mode.endswith(":gz") else buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def zip_symlink(name: str, target: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo(name)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, target)
    return buffer.getvalue()


def extract(tmp_path: Path, data: bytes, name: str = "a.tar.gz", max_bytes: int = 10 * MIB):
    archive = tmp_path / "in" / name
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(data)
    return extract_archive(
        archive,
        tmp_path / "box" / "target",
        label=name,
        max_bytes=max_bytes,
        staging_parent=tmp_path / "box" / ".staging",
    )


def written(tmp_path: Path) -> list[str]:
    """Every path created outside the input folder (staging folders are cleaned up)."""
    return sorted(
        p.relative_to(tmp_path).as_posix()
        for p in tmp_path.rglob("*")
        if "in" not in p.relative_to(tmp_path).parts[:1] and not p.is_dir()
    )


def test_a_clean_tar_gz_is_extracted_with_links_inside(tmp_path: Path) -> None:
    data = tar_bytes(
        (member("./", tarfile.DIRTYPE), None),
        (member("top/a.txt"), b"alpha"),
        (member("top/sub", tarfile.DIRTYPE), None),
        (member("top/sub/b.txt"), b"beta"),
        (member("top/hard.txt", tarfile.LNKTYPE, "top/a.txt"), None),
        (member("top/soft.txt", tarfile.SYMTYPE, "sub/b.txt"), None),
        (member("__MACOSX/top/._a.txt"), b"resource fork"),
        (member("top/._b.txt"), b"resource fork"),
    )
    files = extract(tmp_path, data)
    assert [(f.rel_path, f.bytes) for f in files] == [
        ("top/a.txt", 5),
        ("top/hard.txt", 5),
        ("top/soft.txt", 4),
        ("top/sub/b.txt", 4),
    ]
    assert {f.rel_path: f.sha256 for f in files}["top/soft.txt"] == hashlib.sha256(
        b"beta"
    ).hexdigest()
    target = tmp_path / "box" / "target"
    assert (target / "top" / "soft.txt").is_symlink()
    assert (target / "top" / "soft.txt").read_bytes() == b"beta"
    assert (target / "top" / "hard.txt").read_bytes() == b"alpha"
    assert not (target / "__MACOSX").exists() and not (target / "top" / "._b.txt").exists()
    assert not (tmp_path / "box" / ".staging").exists() or not any(
        (tmp_path / "box" / ".staging").iterdir()
    )


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (zip_bytes({"ok.txt": b"1", "../evil.txt": b"x"}), "slip.zip", "climbs out"),
        (zip_bytes({"a/../../../evil.txt": b"x"}), "deep.zip", "climbs out"),  # '..' not first
        (zip_bytes({"a/b/./../../../evil.txt": b"x"}), "dots.zip", "climbs out"),
        (zip_bytes({"a/b/..\\..\\..\\evil.txt": b"x"}), "deep-win.zip", "climbs out"),
        (zip_bytes({"/tmp/evil.txt": b"x"}), "abs.zip", "is absolute"),
        (zip_bytes({"..\\..\\evil.txt": b"x"}), "win.zip", "climbs out"),
        (zip_symlink("link", "../../outside"), "link.zip", "outside the archive"),
        (tar_bytes((member("../evil.txt"), b"x")), "slip.tgz", "climbs out"),
        (tar_bytes((member("a/../../evil.txt"), b"x")), "deep.tgz", "climbs out"),
        (tar_bytes((member("a/b/../../../evil.txt"), b"x")), "deep-slip.tgz", "climbs out"),
        (tar_bytes((member("l", tarfile.SYMTYPE, "../../etc"), None)), "s.tgz", "outside"),
        (tar_bytes((member("l", tarfile.SYMTYPE, "/etc/passwd"), None)), "abs.tgz", "outside"),
        (
            tar_bytes((member("sub", tarfile.SYMTYPE, ".."), None), (member("sub/evil.txt"), b"x")),
            "through.tar",
            "outside",
        ),
        (
            tar_bytes(
                (member("d", tarfile.DIRTYPE), None),
                (member("d/x.txt"), b"x"),
                (member("d", tarfile.SYMTYPE, "."), None),
            ),
            "collide.tar",
            "collides",
        ),
        (
            tar_bytes(
                (member("a", tarfile.SYMTYPE, "."), None),
                (member("b", tarfile.SYMTYPE, "a/.."), None),
            ),
            "chain.tar",
            "resolves outside",
        ),
        (tar_bytes((member("h", tarfile.LNKTYPE, "../../etc/passwd"), None)), "h.tar", "hard"),
        (tar_bytes((member("h", tarfile.LNKTYPE, "not-there"), None)), "h2.tar", "earlier file"),
        (tar_bytes((member("dev", tarfile.CHRTYPE), None)), "dev.tar", "device file"),
        (tar_bytes((member("fifo", tarfile.FIFOTYPE), None)), "fifo.tar", "FIFO"),
    ],
)
def test_malicious_archives_are_refused_and_write_nothing(
    tmp_path: Path, data: bytes, name: str, reason: str
) -> None:
    with pytest.raises(UnsafeArchiveError) as caught:
        extract(tmp_path, data, name=name)
    assert reason in str(caught.value)
    assert str(caught.value).startswith(f"{name}: unsafe archive, nothing extracted")
    assert written(tmp_path) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_declared_expansion_over_the_bound_is_refused(tmp_path: Path) -> None:
    data = tar_bytes((member("a.bin"), bytes(600_000)), (member("b.bin"), bytes(600_000)))
    with pytest.raises(UnsafeArchiveError, match="past 1000000 bytes"):
        extract(tmp_path, data, max_bytes=1_000_000)
    assert written(tmp_path) == []


def test_a_zip_bomb_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", bytes(20 * MIB))
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(UnsafeArchiveError, match=r"zeros\.bin' takes the expansion past"):
        extract(tmp_path, buffer.getvalue(), name="bomb.zip", max_bytes=MIB)
    assert written(tmp_path) == []


def test_a_corrupt_archive_is_a_clear_file_error(tmp_path: Path) -> None:
    with pytest.raises(FileFetchError, match=r"broken\.tar\.gz: not a readable archive"):
        extract(tmp_path, b"\x1f\x8b" + bytes(200), name="broken.tar.gz")


def test_archive_names() -> None:
    assert archive_stem("NCT-CRC-HE-100K.zip") == "NCT-CRC-HE-100K"
    assert archive_stem("x.TAR.GZ") == "x"
    assert archive_stem("a.tgz") == "a"
    assert archive_stem("camelyonpatch.h5.gz") is None
    assert archive_stem(".zip") is None


def test_an_unsafe_archive_in_a_source_fails_only_that_file(
    server: FakeServer, tmp_path: Path
) -> None:
    evil = tar_bytes((member("ok.txt"), b"fine"), (member("../../escape.txt"), b"x"))
    good = zip_bytes({"img/1.png": b"png"})
    spec = {
        "type": "http",
        "files": [
            {"url": server.serve("/evil.tar.gz", evil), "md5": hashlib.md5(evil).hexdigest()},
            {"url": server.serve("/good.zip", good), "md5": hashlib.md5(good).hexdigest()},
        ],
    }
    settings = DownloadSettings(retries=1, backoff_s=0.01, timeout_s=5)
    with pytest.raises(SourceIncomplete) as caught:
        fetch_source(spec, tmp_path / "raw", settings=settings)
    (failed,) = caught.value.failures
    assert failed["file"] == "evil.tar.gz"
    assert "member '../../escape.txt' has an unsafe path" in failed["reason"]
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [f"raw/{STATE_FILE}", "raw/good/img/1.png"]


def test_the_expansion_bound_comes_from_the_settings(server: FakeServer, tmp_path: Path) -> None:
    data = zip_bytes({"big.bin": bytes(300_000)})
    spec = {
        "type": "http",
        "files": [
            {"url": server.serve("/b.zip", data), "sha256": hashlib.sha256(data).hexdigest()}
        ],
    }
    settings = DownloadSettings(max_extracted_bytes=100_000, retries=0, timeout_s=5)
    with pytest.raises(SourceIncomplete, match=r"b\.zip: unsafe archive.*past 100000 bytes"):
        fetch_source(spec, tmp_path, settings=settings)
    spec["files"][0]["extract"] = False
    rows = fetch_source(spec, tmp_path, settings=settings)
    assert [r["rel_path"] for r in rows] == ["b.zip"]


def test_archives_of_one_source_cannot_chain_links_out_of_the_folder(
    server: FakeServer, tmp_path: Path
) -> None:
    """Each archive is harmless alone; together, `sub/up` (the folder itself) then `sub/up/esc`
    (`..` from there: the folder's parent) would let `sub/up/esc/evil.txt` land outside it."""
    archives = {
        "a.tar": tar_bytes((member("sub/up", tarfile.SYMTYPE, ".."), None), mode="w"),
        "b.zip": zip_symlink("sub/up/esc", ".."),
        "c.tar.gz": tar_bytes((member("sub/up/esc/evil.txt"), b"x")),
    }
    spec = {
        "type": "http",
        "files": [
            {"url": server.serve(f"/{name}", data), "sha256": hashlib.sha256(data).hexdigest(),
             "extract_to": "."}
            for name, data in archives.items()
        ],
    }  # fmt: skip
    settings = DownloadSettings(concurrency=1, retries=0, timeout_s=5)  # in the listed order
    raw = tmp_path / "data" / "raw"
    with pytest.raises(SourceIncomplete) as caught:
        fetch_source(spec, raw, settings=settings)
    (failed,) = caught.value.failures
    assert failed["file"] == "b.zip"
    assert (
        "member 'sub/up/esc' resolves outside via '..' with the links already" in failed["reason"]
    )
    assert (raw / "sub" / "up").readlink().as_posix() == ".."  # a's link stays: it points inside
    assert (raw / "esc" / "evil.txt").read_bytes() == b"x"  # c's file lands inside, through it
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(raw) and p.is_file()]
    assert outside == []


def test_a_member_is_not_written_through_a_link_on_disk_that_leaves_the_folder(
    tmp_path: Path,
) -> None:
    target = tmp_path / "box" / "target"
    target.mkdir(parents=True)
    (target / "out").symlink_to("../..")  # left by an earlier extraction or by hand
    with pytest.raises(UnsafeArchiveError) as caught:
        extract(tmp_path, tar_bytes((member("out/evil.txt"), b"x")), name="c.tgz")
    assert "member 'out/evil.txt' would be written outside the folder" in str(caught.value)
    assert not (tmp_path / "evil.txt").exists()
    assert [p.name for p in target.iterdir()] == ["out"]
