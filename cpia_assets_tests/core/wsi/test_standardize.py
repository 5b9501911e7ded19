from __future__ import annotations

import json
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import openslide
import pytest
import pyvips
from PIL import Image

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.downloads.state import DownloadState, verified_digests
from cpia_assets.core.fsutil import sha256_file
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.wsi import pyramid, slide_jobs
from cpia_assets.core.wsi.resample import ResamplePlan, plan_resample, resample_rows, shrink_image
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slide_jobs import standardize_partition
from cpia_assets.core.wsi.slides import Mpp, SlideInfo
from cpia_assets_tests.support.paths import TESTDATA
from cpia_assets_tests.support.slide_factory import build_40x_slide, real_pixels

KEY = "wsi-test"
BAD = ["openslide-boxes.tiff", "openslide-unopenable.tiff", "openslide-unreadable.svs"]
GOOD = ["CMU-1-Small-Region.svs", "openslide-small.svs"]


def _raw_dir(tmp_path: Path, names: list[str]) -> list[Path]:
    raw = tmp_path / "data" / "raw" / KEY
    raw.mkdir(parents=True)
    for name in names:
        (raw / name).symlink_to(TESTDATA / name)
    return sorted(raw.iterdir())


def _info(sizes: list[tuple[int, int]]) -> SlideInfo:
    downsamples = tuple(sizes[0][0] / width for width, _ in sizes)
    return SlideInfo(Path("s.svs"), "generic-tiff", tuple(sizes), downsamples, {})


def _chunks(pixels: np.ndarray, rows: int):
    for top in range(0, len(pixels), rows):
        yield pixels[top : top + rows]


@pytest.mark.parametrize(
    "scale",
    [
        (0.25 / 0.491, 0.25 / 0.491),  # 40x: area filter
        (0.499 / 0.491, 0.499 / 0.491),  # 20x: 1.6% Lanczos enlargement
        (0.61, 1.07),  # mpp-x != mpp-y: area across, Lanczos down
    ],
)
def test_banded_resampling_equals_one_whole_resize(scale):
    pixels = real_pixels()[:900, :700]
    height, width = pixels.shape[:2]
    output = (int(width * scale[0]), int(height * scale[1]))
    plan = ResamplePlan(0, (width, height), scale, output, (0.491, 0.491))
    banded = np.concatenate(list(resample_rows(_chunks(pixels, 128), plan, band_rows=37)))
    filters = [Image.Resampling.BOX if s <= 1 else Image.Resampling.LANCZOS for s in scale]
    across = Image.fromarray(pixels).resize(
        (output[0], height), filters[0], box=(0, 0, output[0] / scale[0], height)
    )
    whole = across.resize(output, filters[1], box=(0, 0, output[0], output[1] / scale[1]))
    difference = np.abs(banded.astype(int) - np.asarray(whole))
    # Equal except where float rounding moves a filter window edge onto the next pixel.
    assert difference.max() <= 4
    assert (difference > 0).mean() < 1e-3


def _box_reference(pixels: np.ndarray, output: tuple[int, int], scale) -> np.ndarray:
    height, width = pixels.shape[:2]
    box = (0, 0, min(width, output[0] / scale[0]), min(height, output[1] / scale[1]))
    return np.asarray(Image.fromarray(pixels).resize(output, Image.Resampling.BOX, box=box))


@pytest.mark.parametrize(
    "scale",
    [
        (0.25 / 0.491, 0.25 / 0.491),  # 40x: fractional factor 1.964
        (0.2, 0.25),  # whole factors: exact box averages
        (0.13, 0.61),  # mpp-x != mpp-y: box of 7 then the fractional rest across
    ],
)
def test_shrinking_in_libvips_is_an_area_average(scale):
    pixels = real_pixels()[:900, :700]
    height, width = pixels.shape[:2]
    output = (int(width * scale[0]), int(height * scale[1]))
    plan = ResamplePlan(0, (width, height), scale, output, (0.491, 0.491))
    shrunk = shrink_image(pyvips.Image.new_from_array(pixels), plan).numpy()
    assert shrunk.shape == (output[1], output[0], 3)
    difference = np.abs(shrunk.astype(int) - _box_reference(pixels, output, scale))
    if all((1 / s).is_integer() for s in scale):
        assert difference.max() <= 1  # the same box averages, up to rounding
    else:
        # The fractional rest is weighted by footprint overlap instead of whole pixels.
        assert difference.mean() < 1.5
        assert np.percentile(difference, 99) <= 12
    with pytest.raises(ValueError, match="cannot enlarge"):
        shrink_image(
            pyvips.Image.new_from_array(pixels), ResamplePlan(0, (9, 9), (1.1, 1), (9, 9), (1, 1))
        )


def test_resampling_streams_source_rows_instead_of_holding_the_level():
    pixels = np.zeros((4000, 50, 3), np.uint8)
    pulled = []

    def source():
        for chunk in _chunks(pixels, 100):
            pulled.append(len(chunk))
            yield chunk

    plan = ResamplePlan(0, (50, 4000), (0.5, 0.5), (25, 2000), (0.5, 0.5))
    bands = resample_rows(source(), plan, band_rows=50)
    next(bands)
    assert sum(pulled) <= 200  # one output band needs ~100 source rows plus the filter margin
    assert sum(len(band) for band in bands) == 2000 - 50


def _open_descriptors() -> int:
    """Open descriptors, once libvips' cache no longer holds files of earlier tests."""
    pyramid.trim_operation_cache()
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def _row_feeders() -> int:
    """Threads still feeding rows to libvips (`pyramid._PngRowStream.feed`)."""
    return sum(thread.name == "png-rows" for thread in threading.enumerate())


def test_streamed_pyramid_holds_exactly_the_rows_given(tmp_path: Path):
    pixels = real_pixels()[:700, :600]
    dest = tmp_path / "s.tiff"
    before = _open_descriptors()
    pyramid.write_pyramid_tiff(
        dest, _chunks(pixels, 64), size=(600, 700), mpp=(0.5, 0.5),
        settings=StandardizeSettings(jpeg_quality=100),
    )  # fmt: skip
    assert (_open_descriptors(), _row_feeders()) == (before, 0)
    written = pyvips.Image.tiffload(str(dest)).numpy()
    assert written.shape == pixels.shape
    assert np.abs(written.astype(int) - pixels).mean() < 1.5  # JPEG q100


def test_streamed_pyramid_fails_with_the_producers_error_or_libvips_own(tmp_path: Path):
    pixels = real_pixels()[:700, :600]

    def failing_rows():
        yield pixels[:300]
        raise RuntimeError("tile 3 of the source is not a JPEG")

    settings = StandardizeSettings()
    with pytest.raises(RuntimeError, match="not a JPEG"):
        pyramid.write_pyramid_tiff(
            tmp_path / "a.tiff", failing_rows(), size=(600, 700), mpp=(0.5, 0.5), settings=settings
        )

    # The reader gives up first (no such folder) while rows are still coming: the producer
    # thread is stopped, not left blocked on a full pipe.
    def endless_rows():
        while True:
            yield pixels[:100]

    with pytest.raises(pyvips.Error, match="unable to open"):
        pyramid.write_pyramid_tiff(
            tmp_path / "missing" / "b.tiff", endless_rows(), size=(600, 10**6), mpp=(0.5, 0.5),
            settings=settings,
        )  # fmt: skip
    assert _row_feeders() == 0


def test_plan_picks_the_coarsest_level_not_coarser_than_the_target():
    sizes = [(80_000, 40_000), (40_000, 20_000), (20_000, 10_000), (10_000, 5_000)]
    plan = plan_resample(_info(sizes), Mpp(0.1, 0.1, "openslide"), StandardizeSettings())
    assert plan.level == 2  # 0.4 um/px; level 3 (0.8) would be coarser than 0.491
    assert plan.scale == pytest.approx((0.4 / 0.491, 0.4 / 0.491))
    assert plan.output_size == (int(20_000 * 0.4 / 0.491), int(10_000 * 0.4 / 0.491))
    forty_x = plan_resample(_info(sizes[:2]), Mpp(0.25, 0.25, "openslide"), StandardizeSettings())
    assert forty_x.level == 0


def test_tolerance_leaves_near_target_slides_alone_and_zero_never_snaps():
    info, mpp = _info([(2000, 1000)]), Mpp(0.499, 0.499, "openslide")
    exact = plan_resample(info, mpp, StandardizeSettings())
    assert exact.resampled and exact.output_size == (2032, 1016)
    loose = plan_resample(info, mpp, StandardizeSettings(tolerance=0.02))
    assert not loose.resampled and loose.output_mpp == (0.499, 0.499)
    assert plan_resample(info, mpp, StandardizeSettings(tolerance=0.01)).resampled


def test_partition_standardizes_good_slides_and_records_every_bad_one(tmp_path: Path):
    layout = DataLayout(tmp_path / "data")
    files = _raw_dir(tmp_path, GOOD + BAD + ["TCGA-CR-7395-01A-01-TS1.svs"])
    messages: list[str] = []
    pool = ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn"))
    with pool:
        result = standardize_partition(
            files,
            key=KEY,
            layout=layout,
            options=WsiOptions(),
            settings=StandardizeSettings(),
            executor=pool,
            progress=messages.append,
        )
    reasons = {Path(row["file"]).name: row["reason"] for row in result.failures}
    assert sorted(reasons) == sorted([*BAD, "TCGA-CR-7395-01A-01-TS1.svs"])
    assert "no MPP in the metadata" in reasons["TCGA-CR-7395-01A-01-TS1.svs"]
    assert "352.778" in reasons["openslide-boxes.tiff"]
    assert "Unsupported TIFF compression" in reasons["openslide-unopenable.tiff"]
    assert "Bogus marker length" in reasons["openslide-unreadable.svs"]
    assert all(reason.startswith(name) for name, reason in reasons.items())
    assert len(messages) == len(files)
    records = {Path(row["source_file"]).name: row for row in result.records}
    assert sorted(records) == sorted(GOOD)
    cmu = records["CMU-1-Small-Region.svs"]
    assert cmu["source_file"] == f"raw/{KEY}/CMU-1-Small-Region.svs"
    assert cmu["standardized_file"] == f"standardized/{KEY}/CMU-1-Small-Region.tiff"
    assert (cmu["mpp_x"], cmu["mpp_origin"], cmu["level"], cmu["resampled"]) == (
        0.499,
        "openslide",
        0,
        True,
    )
    assert cmu["scale_factor"] == pytest.approx(0.499 / 0.491)
    assert (cmu["std_width"], cmu["std_height"]) == (2256, 3015)
    assert cmu["source_bytes"] == (TESTDATA / "CMU-1-Small-Region.svs").stat().st_size
    with openslide.OpenSlide(layout.root / cmu["standardized_file"]) as slide:
        assert slide.dimensions == (2256, 3015)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.491, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.491, rel=1e-6)
        assert slide.level_count > 1
        written = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    expected = Image.fromarray(real_pixels()).resize(
        (2256, 3015),
        Image.Resampling.LANCZOS,
        box=(0, 0, 2256 * 0.491 / 0.499, 3015 * 0.491 / 0.499),
    )
    # JPEG q89 with 4:2:0 chroma (the default): 3.04 measured (0.87 with a q90 RGB TIFF)
    assert np.abs(written.astype(int) - np.asarray(expected)).mean() < 3.5


def test_rerun_reuses_done_slides_and_redoes_interrupted_or_changed_ones(tmp_path: Path):
    layout = DataLayout(tmp_path / "data")
    files = _raw_dir(tmp_path, GOOD)
    settings = StandardizeSettings()

    def run(settings: StandardizeSettings):
        return standardize_partition(
            files, key=KEY, layout=layout, options=WsiOptions(), settings=settings
        )

    first = run(settings)
    output = layout.standardized_dir(KEY) / "CMU-1-Small-Region.tiff"
    written_at = output.stat().st_mtime_ns
    again = run(settings)
    assert (again.reused, again.records) == (2, first.records)
    assert output.stat().st_mtime_ns == written_at
    # An interrupted run: the marker was never written, a temporary folder was left behind.
    (layout.manifest_dir(KEY) / "parts" / "standardized" / "CMU-1-Small-Region.json").unlink()
    stale = output.parent / ".CMU-1-Small-Region.tiff.abc.tmp"
    stale.mkdir()
    (stale / "CMU-1-Small-Region.tiff").write_bytes(b"half")
    resumed = run(settings)
    assert resumed.reused == 1 and not stale.exists()
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "CMU-1-Small-Region.tiff",
        "openslide-small.tiff",
    ]
    changed = run(StandardizeSettings(target_mpp=0.4942))
    assert changed.reused == 0
    marker = json.loads(
        (layout.manifest_dir(KEY) / "parts/standardized/openslide-small.json").read_text()
    )
    assert marker["record"]["target_mpp"] == 0.4942


def test_digests_verified_by_the_download_are_not_read_again(tmp_path: Path, monkeypatch):
    layout = DataLayout(tmp_path / "data")
    files = _raw_dir(tmp_path, GOOD)
    raw = layout.raw_dir(KEY)
    state = DownloadState(dest=raw)
    for path in files:
        state.record(path.name, sha256=sha256_file(path), source=str(path), owned=False)
    state.save()
    small = raw / "openslide-small.svs"
    small.unlink()  # replaced after the download verified it: its digest is no longer known
    small.symlink_to(TESTDATA / "CMU-1-Small-Region.svs")
    known = verified_digests(raw)
    assert set(known) == {raw / "CMU-1-Small-Region.svs"}

    hashed = []

    def counted(path: Path) -> str:
        hashed.append(path.name)
        return sha256_file(path)

    monkeypatch.setattr(slide_jobs, "sha256_file", counted)
    result = standardize_partition(
        files, key=KEY, layout=layout, options=WsiOptions(), settings=StandardizeSettings(),
        known_sha256=known,
    )  # fmt: skip
    assert hashed == ["openslide-small.svs"]
    assert {r["source_file"]: r["source_sha256"] for r in result.records} == {
        layout.stored(path): sha256_file(path) for path in files
    }


def test_tolerance_copies_near_target_slide_at_its_own_mpp(tmp_path: Path):
    layout = DataLayout(tmp_path / "data")
    files = _raw_dir(tmp_path, ["CMU-1-Small-Region.svs"])
    result = standardize_partition(
        files,
        key=KEY,
        layout=layout,
        options=WsiOptions(),
        settings=StandardizeSettings(tolerance=0.02),
    )
    (record,) = result.records
    assert (record["resampled"], record["scale_factor"]) == (False, 1.0)
    with openslide.OpenSlide(layout.root / record["standardized_file"]) as slide:
        assert slide.dimensions == (2220, 2967)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499, rel=1e-6)


def test_slide_without_mpp_is_standardized_with_a_catalog_override(tmp_path: Path):
    layout = DataLayout(tmp_path / "data")
    files = _raw_dir(tmp_path, ["TCGA-CR-7395-01A-01-TS1.svs"])
    options = WsiOptions(mpp_overrides={"TCGA-CR-7395-01A-01-TS1.svs": 0.9})
    result = standardize_partition(
        files, key=KEY, layout=layout, options=options, settings=StandardizeSettings()
    )
    (record,) = result.records
    assert (record["mpp_origin"], record["level"]) == ("override", 0)  # level 1 is 1.8 um/px
    assert (record["std_width"], record["std_height"]) == (8143, 6538)


def test_synthetic_40x_slide_from_real_pixels(tmp_path: Path):
    layout = DataLayout(tmp_path / "data")
    raw = layout.raw_dir(KEY)
    build_40x_slide(raw / "S40-0001.tiff", 6000)
    result = standardize_partition(
        [raw / "S40-0001.tiff"],
        key=KEY,
        layout=layout,
        options=WsiOptions(),
        settings=StandardizeSettings(target_mpp=0.4942, jpeg_quality=80),
    )
    (record,) = result.records
    assert (record["level"], record["mpp_x"]) == (0, 0.25)
    assert (record["std_width"], record["std_height"]) == (
        3035,
        3035,
    )  # floor(6000 * 0.25 / 0.4942)
    with openslide.OpenSlide(layout.root / record["standardized_file"]) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.4942, rel=1e-6)


def test_rerun_deletes_outputs_of_removed_and_now_failing_slides(tmp_path: Path):
    layout = DataLayout(tmp_path / "data")
    files = _raw_dir(tmp_path, GOOD)
    outputs = layout.standardized_dir(KEY)
    markers = layout.manifest_dir(KEY) / "parts" / "standardized"

    def run(slide_files: list[Path]):
        return standardize_partition(
            slide_files,
            key=KEY,
            layout=layout,
            options=WsiOptions(),
            settings=StandardizeSettings(),
        )

    run(files)
    small = [path for path in files if path.name == "openslide-small.svs"]
    kept = run(small)
    assert kept.reused == 1 and not kept.failures
    assert sorted(p.name for p in outputs.iterdir()) == ["openslide-small.tiff"]
    assert sorted(p.name for p in markers.iterdir()) == ["openslide-small.json"]
    # The input now is corrupt (a new file: the shared test slide behind the link is untouched).
    small[0].unlink()
    small[0].write_bytes(b"not a slide")
    broken = run(small)
    assert broken.records == [] and broken.reused == 0
    (row,) = broken.failures
    assert row["file"] == f"raw/{KEY}/openslide-small.svs"
    assert row["reason"].startswith("openslide-small.svs")
    assert list(outputs.iterdir()) == [] and list(markers.iterdir()) == []
    assert sorted(p.name for p in layout.raw_dir(KEY).iterdir()) == sorted(GOOD)


def test_an_unexpected_error_fails_only_its_slide(tmp_path: Path, monkeypatch):
    layout = DataLayout(tmp_path / "data")
    files = _raw_dir(tmp_path, GOOD)
    original = slide_jobs.standardize_slide

    def fail_cmu(source: Path, dest: Path, **kwargs):
        if source.name == "CMU-1-Small-Region.svs":
            raise RuntimeError("out of file handles")
        return original(source, dest, **kwargs)

    monkeypatch.setattr(slide_jobs, "standardize_slide", fail_cmu)
    result = standardize_partition(
        files, key=KEY, layout=layout, options=WsiOptions(), settings=StandardizeSettings()
    )
    (row,) = result.failures
    assert row["file"] == f"raw/{KEY}/CMU-1-Small-Region.svs"
    assert row["reason"] == "CMU-1-Small-Region.svs: RuntimeError: out of file handles"
    assert [record["source_file"] for record in result.records] == [
        f"raw/{KEY}/openslide-small.svs"
    ]
    assert [p.name for p in layout.standardized_dir(KEY).iterdir()] == ["openslide-small.tiff"]
