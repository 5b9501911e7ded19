"""IDC DICOM slides are named by their ContainerIdentifier (the original slide name)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.wsi.dicom import container_identifier
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slide_jobs import standardize_partition
from cpia_assets.core.wsi.slides import select_slides, slide_stem

SERIES = "1.3.6.1.4.1.5962.99.1.2786334768.1849416866.1385765836848.3.0"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def undefined_sequence(group: int, number: int, items: list[bytes]) -> bytes:
    """A sequence of undefined length whose items have undefined length too."""
    body = b"".join(
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + item
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        for item in items
    )
    return (
        struct.pack("<HH2sHI", group, number, b"SQ", 0, 0xFFFFFFFF)
        + body
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )


def dicom_file(path: Path, *, container: bytes | None, syntax: str = EXPLICIT_LE) -> Path:
    """A WSI-like DICOM header: file meta, a nested undefined-length sequence, a large ICC
    profile, the ContainerIdentifier (when given) and the start of the pixel data."""
    meta = element(0x0002, 0x0010, b"UI", syntax.encode())
    meta = element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta))) + meta
    inner = undefined_sequence(0x0040, 0xA730, [element(0x0040, 0xA160, b"UT", b"nested text")])
    data_set = (
        element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.77.1.6")
        # A decoy: a ContainerIdentifier inside a nested item must not be taken.
        + undefined_sequence(0x0008, 0x1140, [element(0x0040, 0x0512, b"LO", b"NESTED") + inner])
        + element(0x0028, 0x2000, b"OB", bytes(70_000))  # ICC profile
        + (element(0x0040, 0x0512, b"LO", container) if container is not None else b"")
        + element(0x0040, 0x0560, b"SQ", b"")
        + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(128) + b"DICM" + meta + data_set)
    return path


def test_container_identifier_names_the_slide(tmp_path: Path):
    dcm = dicom_file(tmp_path / SERIES / "instance-1.dcm", container=b"C3L-00004-21")
    assert container_identifier(dcm) == "C3L-00004-21"
    assert slide_stem(dcm) == "C3L-00004-21"


@pytest.mark.parametrize(
    ("container", "syntax"),
    [
        (None, EXPLICIT_LE),  # no ContainerIdentifier
        (b"../etc", EXPLICIT_LE),  # not usable as a file name
        (b"C3L.00004", EXPLICIT_LE),  # a dot would end the stem early
        (b"C3L-00004-21", IMPLICIT_LE),  # a layout this reader does not walk
    ],
)
def test_slide_falls_back_to_its_series_folder(tmp_path: Path, container, syntax):
    dcm = dicom_file(tmp_path / "series-uuid-7" / "1.dcm", container=container, syntax=syntax)
    assert container_identifier(dcm) is None
    assert slide_stem(dcm) == "series-uuid-7"


def test_truncated_or_foreign_files_give_no_identifier(tmp_path: Path):
    dcm = dicom_file(tmp_path / "s" / "1.dcm", container=b"C3L-00004-21")
    truncated = tmp_path / "t" / "1.dcm"
    truncated.parent.mkdir()
    truncated.write_bytes(dcm.read_bytes()[:-80])  # cut inside the identifier's element
    assert container_identifier(truncated) is None
    (tmp_path / "n.dcm").write_bytes(b"not dicom")
    assert container_identifier(tmp_path / "n.dcm") is None
    assert container_identifier(tmp_path / "missing.dcm") is None


def test_idc_slides_are_recorded_under_their_slide_name_with_the_uuid_kept(tmp_path: Path):
    """Standardizing fails on the fake pixels, but the failure and names show the mapping."""
    layout = DataLayout(tmp_path / "data")
    raw = layout.raw_dir("cptac-test")
    dicom_file(raw / SERIES / "a.dcm", container=b"C3L-00004-21")
    dicom_file(raw / SERIES / "b.dcm", container=b"C3L-00004-21")  # same series: one slide
    dicom_file(raw / "other-series" / "a.dcm", container=b"C3L-00004-21")  # same slide name
    slides = select_slides(raw, WsiOptions()).used
    assert [slide_stem(path) for path in slides] == ["C3L-00004-21", "C3L-00004-21"]
    result = standardize_partition(
        slides, key="cptac-test", layout=layout, options=WsiOptions(),
        settings=StandardizeSettings(),
    )  # fmt: skip
    reasons = {row["file"]: row["reason"] for row in result.failures}
    assert set(reasons) == {f"raw/cptac-test/{SERIES}/a.dcm", "raw/cptac-test/other-series/a.dcm"}
    duplicate = reasons["raw/cptac-test/other-series/a.dcm"]
    assert "slide name 'C3L-00004-21' is already used" in duplicate
    assert "cannot open" in reasons[f"raw/cptac-test/{SERIES}/a.dcm"]  # fake pixels
