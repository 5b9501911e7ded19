from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.wsi.slides import (
    MppError,
    SlideOpenError,
    SlideReadError,
    open_slide,
    resolve_mpp,
    select_slides,
    slide_stem,
)
from cpia_assets_tests.support.paths import TESTDATA
from cpia_assets_tests.support.slide_factory import build_slide, mirrored

CMU = TESTDATA / "CMU-1-Small-Region.svs"
TCGA = TESTDATA / "TCGA-CR-7395-01A-01-TS1.svs"


def _read_all(reader, level: int = 0, chunk_rows: int = 256) -> np.ndarray:
    return np.concatenate(list(reader.iter_rows(level, chunk_rows)))


def test_select_slides_by_extension_and_says_why_every_other_file_is_left_out(tmp_path: Path):
    for name in [
        "b/slide.svs",
        "a.ndpi",
        "c.mrxs",
        "c/Data0001.dat",
        "c/Slidedat.ini",
        "dicom/one/1.dcm",
        "dicom/one/2.dcm",
        "notes.csv",
        "photo.png",
        ".a.svs.x.tmp/a.svs",
        ".hidden.svs",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "linked").symlink_to(tmp_path / "b")
    selection = select_slides(tmp_path, WsiOptions())
    found = [p.relative_to(tmp_path).as_posix() for p in selection.used]
    assert found == ["a.ndpi", "b/slide.svs", "c.mrxs", "dicom/one/1.dcm", "linked/slide.svs"]
    assert selection.skipped == [
        ("c/Data0001.dat", "data file of the MIRAX slide c.mrxs"),
        ("c/Slidedat.ini", "data file of the MIRAX slide c.mrxs"),
        ("dicom/one/2.dcm", "another file of the DICOM slide dicom/one/1.dcm"),
        ("notes.csv", "not a slide file (.csv)"),
        ("photo.png", "plain image (.png): set wsi.allow_plain_images to read it as a slide"),
    ]
    assert selection.skipped_rows("raw/k")[3] == {
        "file": "raw/k/notes.csv",
        "reason": "not a slide file (.csv)",
    }
    with_plain = select_slides(tmp_path, WsiOptions(allow_plain_images=True))
    assert tmp_path / "photo.png" in with_plain.used
    by_pattern = select_slides(tmp_path, WsiOptions(patterns=("b/*",)))
    assert by_pattern.used == [tmp_path / "b" / "slide.svs"]
    assert ("a.ndpi", "matches none of the catalog's slide patterns ['b/*']") in by_pattern.skipped
    assert len(by_pattern.used) + len(by_pattern.skipped) == 10  # every visible file


def test_slide_stem_is_name_up_to_first_dot_and_dicom_folder():
    assert slide_stem(Path("TCGA-A2-A0EY-01A-01-BSA.1f3c-uuid.svs")) == "TCGA-A2-A0EY-01A-01-BSA"
    assert slide_stem(Path("x/DEMO40-0001.tiff")) == "DEMO40-0001"
    assert slide_stem(Path("series-7/1.2.840.5.dcm")) == "series-7"


@pytest.mark.parametrize(
    ("properties", "options", "expected"),
    [
        ({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26"}, WsiOptions(), (0.25, 0.26)),
        ({"openslide.mpp-x": "0.25"}, WsiOptions(), (0.25, 0.25)),
        ({"aperio.MPP": "0.4990"}, WsiOptions(), (0.499, 0.499)),
        (
            {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"},
            WsiOptions(),
            (0.25, 0.25),
        ),
        (
            {
                "tiff.ResolutionUnit": "inch",
                "tiff.XResolution": "50800",
                "tiff.YResolution": "25400",
            },
            WsiOptions(),
            (0.5, 1.0),
        ),
        ({}, WsiOptions(mpp_overrides={"s.svs": 0.3}), (0.3, 0.3)),
        ({}, WsiOptions(mpp_overrides={"s": 0.3}), (0.3, 0.3)),
        ({"openslide.objective-power": "20"}, WsiOptions(use_objective_power=True), (0.5, 0.5)),
    ],
)
def test_resolve_mpp_sources(properties, options, expected):
    mpp = resolve_mpp(Path("s.svs"), properties, options)
    assert (mpp.x, mpp.y) == pytest.approx(expected)


def test_resolve_mpp_order_and_origin():
    both = {"openslide.mpp-x": "0.25", "aperio.MPP": "0.5", "openslide.objective-power": "40"}
    assert resolve_mpp(Path("s.svs"), both, WsiOptions()).origin == "openslide"
    vendor = {"aperio.MPP": "0.5", "openslide.objective-power": "40"}
    options = WsiOptions(use_objective_power=True, mpp_overrides={"s": 0.3})
    assert resolve_mpp(Path("s.svs"), vendor, options).origin == "vendor:aperio.MPP"
    power = resolve_mpp(Path("t.svs"), {"openslide.objective-power": "40"}, options)
    assert power.origin == "objective-power" and power.estimated and power.x == 0.25


def test_out_of_range_mpp_falls_through_to_the_override():
    bogus = {"openslide.mpp-x": "352.78", "openslide.mpp-y": "352.78"}
    with pytest.raises(MppError, match=r"s\.tiff: no usable MPP: openslide gives 352\.78"):
        resolve_mpp(Path("s.tiff"), bogus, WsiOptions())
    fixed = resolve_mpp(Path("s.tiff"), bogus, WsiOptions(mpp_overrides={"s.tiff": 0.5}))
    assert (fixed.x, fixed.origin) == (0.5, "override")


def test_objective_power_is_only_used_when_opted_in():
    properties = {"openslide.objective-power": "20"}
    with pytest.raises(MppError, match="objective power not enabled"):
        resolve_mpp(Path("s.svs"), properties, WsiOptions())


def test_real_svs_metadata_and_pixels_match_openslide():
    with open_slide(CMU, WsiOptions()) as reader:
        mpp = reader.resolve_mpp(WsiOptions())
        assert (mpp.x, mpp.y, mpp.origin) == (0.499, 0.499, "openslide")
        assert reader.info.vendor == "aperio"
        pixels = _read_all(reader)
    with openslide.OpenSlide(CMU) as slide:
        expected = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    assert pixels.shape == (2967, 2220, 3)
    np.testing.assert_array_equal(pixels, expected)


def test_jpeg2000_svs_without_mpp_reads_through_openslide_and_needs_an_override():
    options = WsiOptions(use_objective_power=True)
    with open_slide(TCGA, options) as reader:
        with pytest.raises(MppError, match=r"TCGA-CR-7395-01A-01-TS1\.svs: no usable MPP"):
            reader.resolve_mpp(options)
        override = WsiOptions(mpp_overrides={"TCGA-CR-7395-01A-01-TS1": 0.2527})
        assert reader.resolve_mpp(override).origin == "override"
        level1 = _read_all(reader, level=1, chunk_rows=700)
    assert level1.shape == (1783, 2221, 3)
    assert level1.mean() < 230  # tissue, not an empty white image


def test_bogus_72_dpi_tags_are_rejected():
    reader = open_slide(TESTDATA / "openslide-boxes.tiff", WsiOptions())
    with reader, pytest.raises(MppError, match=r"352\.778"):
        reader.resolve_mpp(WsiOptions())


def test_unopenable_and_unreadable_slides_raise_errors_naming_the_file():
    with pytest.raises(SlideOpenError, match=r"openslide-unopenable\.tiff: .*52479"):
        open_slide(TESTDATA / "openslide-unopenable.tiff", WsiOptions())
    reader = open_slide(TESTDATA / "openslide-unreadable.svs", WsiOptions())
    with reader, pytest.raises(SlideReadError, match=r"openslide-unreadable\.svs: .*Bogus marker"):
        _read_all(reader)


def test_synthetic_pyramid_levels_stream_with_identical_pixels(tmp_path: Path):
    path = build_slide(tmp_path / "pyr.tiff", mirrored(3000, 2000), mpp=0.25)
    with open_slide(path, WsiOptions()) as reader, openslide.OpenSlide(path) as slide:
        assert reader.info.level_dimensions == tuple(slide.level_dimensions)
        for level in (0, 1):
            pixels = _read_all(reader, level=level, chunk_rows=256)
            size = slide.level_dimensions[level]
            expected = np.asarray(slide.read_region((0, 0), level, size).convert("RGB"))
            np.testing.assert_array_equal(pixels, expected)


def test_plain_images_need_opt_in_and_read_their_resolution(tmp_path: Path):
    path = tmp_path / "flat.tif"
    pixels = mirrored(300, 200).numpy()
    Image.fromarray(pixels).save(path, dpi=(50800, 50800))  # 0.5 um/px
    with pytest.raises(SlideOpenError, match=r"flat\.tif: OpenSlide cannot open it"):
        open_slide(path, WsiOptions())
    options = WsiOptions(allow_plain_images=True)
    with open_slide(path, options) as reader:
        mpp = reader.resolve_mpp(options)
        assert (mpp.origin, mpp.x) == ("tiff-tags", pytest.approx(0.5, rel=1e-4))
        np.testing.assert_array_equal(_read_all(reader, chunk_rows=64), pixels)


def test_corrupt_plain_image_is_reported(tmp_path: Path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SlideOpenError, match=r"broken\.png: .*pyvips cannot open it"):
        open_slide(path, WsiOptions(allow_plain_images=True))
