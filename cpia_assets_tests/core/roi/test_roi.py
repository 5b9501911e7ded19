"""ROI standardization on real tissue crops from the shared test slides and generated images."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import openslide
import pytest
import pyvips
from PIL import Image, ImageOps

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.model import SubDataset
from cpia_assets.core.downloads.state import DownloadState, verified_digests
from cpia_assets.core.fsutil import sha256_file
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS, hamming, phash, phash_file
from cpia_assets.core.roi import standardize as roi_standardize
from cpia_assets.core.roi.images import (
    RoiSettings,
    crop_box,
    load_square,
    standardize_image,
    to_rgb,
)
from cpia_assets.core.roi.standardize import (
    STAGE,
    RoiError,
    find_roi_images,
    output_stems,
    standardize_roi_partition,
)
from cpia_assets.core.schema import TILES, frame
from cpia_assets.core.synthetic import generate_source
from cpia_assets_tests.support.paths import TESTDATA
from cpia_assets_tests.support.xlsx_factory import write_xlsx

KEY = "roi-test"


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """A 640x960 RGB region of real H&E tissue from CMU-1-Small-Region.svs."""
    with openslide.OpenSlide(TESTDATA / "CMU-1-Small-Region.svs") as slide:
        region = slide.read_region((700, 900), 0, (640, 960)).convert("RGB")
    return np.asarray(region)


def roi_entry(**fields: object) -> SubDataset:
    values: dict[str, object] = {
        "key": KEY,
        "name": "ROI test",
        "kind": "roi",
        "organ": "breast",
        "source": {"type": "manual"},
        "scale": "M",
    }
    values.update(fields)
    return SubDataset(**values)  # type: ignore[arg-type]


def save(path: Path, image: Image.Image | np.ndarray, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **options)
    return path


def run(
    entry: SubDataset, layout: DataLayout, settings: RoiSettings | None = None, **kwargs: object
):
    return standardize_roi_partition(
        entry,
        source_dir=layout.raw_dir(entry.key),
        layout=layout,
        settings=settings or RoiSettings(),
        **kwargs,  # type: ignore[arg-type]
    )


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert image.mode == "RGB"
        return np.asarray(image, dtype=np.float64)


def luma(pixels: np.ndarray) -> np.ndarray:
    """Luminance: compared instead of RGB because JPEG subsamples chroma (4:2:0)."""
    return np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("L"), dtype=np.float64)


def resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """An independent resize of an already cropped square."""
    square = Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(square, dtype=np.float64)


def luma_error(output: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(luma(output) - luma(expected)).mean())


def by_name(records: list[dict]) -> dict[str, dict]:
    return {record["image_name"]: record for record in records}


def test_crop_box_is_the_centred_square() -> None:
    assert crop_box(500, 300) == (100, 0, 400, 300)
    assert crop_box(300, 500) == (0, 100, 300, 400)
    assert crop_box(301, 200) == (50, 0, 250, 200)  # odd leftover falls right
    assert crop_box(700, 700, fraction=5 / 7) == (100, 100, 600, 600)
    assert crop_box(3, 1, fraction=0.1) == (1, 0, 2, 1)  # never empty


def test_to_rgb_scales_sixteen_bit_and_composites_on_white() -> None:
    grey16 = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(grey16)))[0].tolist() == [
        [0, 0, 0],
        [100, 100, 100],
        [255, 255, 255],
        [4, 4, 4],
    ]
    grey_alpha = Image.fromarray(np.array([[[40, 255], [40, 0], [40, 128]]], np.uint8), "LA")
    assert np.asarray(to_rgb(grey_alpha))[0, :, 0].tolist() == [40, 255, 147]
    keyed = Image.fromarray(np.array([[[10, 20, 30], [10, 20, 31]]], np.uint8))
    keyed.info["transparency"] = (10, 20, 30)  # a PNG tRNS colour key
    assert np.asarray(to_rgb(keyed))[0].tolist() == [[255, 255, 255], [10, 20, 31]]


def test_find_roi_images_by_extension_recursively_sorted(tmp_path: Path) -> None:
    for name in ("b/2.PNG", "a/1.jpeg", "a/z.tif", "c.bmp", "d.TIFF", "e.jpg"):
        save(tmp_path / name, np.zeros((4, 4, 3), np.uint8), format="PNG")
    for name in ("labels.csv", "notes.txt", "a/._1.jpeg", ".cache/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not an image")
    selection = find_roi_images(tmp_path, {"labels.csv"})
    found = [path.relative_to(tmp_path).as_posix() for path in selection.used]
    assert found == ["a/1.jpeg", "a/z.tif", "b/2.PNG", "c.bmp", "d.TIFF", "e.jpg"]
    assert [(rel, reason.split(" (")[0]) for rel, reason in selection.skipped] == [
        ("labels.csv", "label or split table of the catalog"),
        ("notes.txt", "not an image of a known type"),
    ]
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "b" / "up").symlink_to(tmp_path)  # a loop
    (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(b"latin-1 name")
    refused = find_roi_images(tmp_path).refused
    assert refused == [
        ("b/up", "loops back to a folder above it; not followed"),
        ("caf\\xe9.png", "the name is not valid UTF-8; rename it"),
        ("gone.png", f"broken link to {tmp_path / 'nowhere.png'}"),
    ]
    assert find_roi_images(tmp_path).refused_rows("raw/k", STAGE)[1] == {
        "file": "raw/k/caf\\xe9.png",
        "stage": STAGE,
        "reason": "the name is not valid UTF-8; rename it",
    }
    with pytest.raises(RoiError, match="does not exist"):
        find_roi_images(tmp_path / "missing")


def test_output_is_the_resized_centre_square_of_a_real_crop(
    tmp_path: Path, tissue: np.ndarray
) -> None:
    layout = DataLayout(tmp_path)
    wide = tissue[:300, :500].copy()
    wide[:, :100] = (255, 0, 0)  # outside the centre square: must not show
    wide[:, 400:] = (0, 0, 255)
    save(layout.raw_dir(KEY) / "wide.png", wide)
    save(layout.raw_dir(KEY) / "tall.tif", tissue[:700, :450])
    result = run(roi_entry(), layout)
    assert not result.failures
    records = by_name(result.records)
    for name, source, expected_square, shifted_by_one in (
        ("wide", "wide.png", wide[:, 100:400], wide[:, 101:401]),
        ("tall", "tall.tif", tissue[125:575, :450], tissue[126:576, :450]),
    ):
        record = records[name]
        output = tmp_path / record["path"]
        assert record["path"] == f"cpia/M/{KEY}/{name}.jpg"
        pixels = read_rgb(output)
        assert pixels.shape == (384, 384, 3)
        error = luma_error(pixels, resized(expected_square, 384))
        assert error < 3, f"{name}: mean luma error {error:.2f} against an independent crop"
        assert luma_error(pixels, resized(shifted_by_one, 384)) > 3 * error
        assert record["source_file"] == f"raw/{KEY}/{source}"
        assert record["source_sha256"] == sha256_file(layout.raw_dir(KEY) / source)
        assert record["bytes"] == output.stat().st_size
        assert record["upscaled"] is (name == "wide")  # a 300 px square is enlarged
        assert record["mean_r"] == pytest.approx(pixels[..., 0].mean(), abs=1.5)
        assert record["mean_b"] == pytest.approx(pixels[..., 2].mean(), abs=1.5)
        assert 0 < record["saturation"] < 1
    # No red or blue margin pixel made it in: the output is pink/purple tissue throughout.
    assert read_rgb(tmp_path / records["wide"]["path"])[:, :4, 2].mean() > 100
    rows = frame(result.records, TILES)
    assert rows["kind"].to_list() == ["roi", "roi"]
    assert rows["size_px"].to_list() == [384, 384]
    assert rows["x"].null_count() == 2
    assert rows["split"].to_list() == ["none", "none"]
    assert rows["label"].null_count() == 2


def test_exact_crop_without_resize_and_crop_fraction(tmp_path: Path, tissue: np.ndarray) -> None:
    """With size = the square's side the output is the crop itself, pixel for pixel (q=100)."""
    layout = DataLayout(tmp_path)
    save(layout.raw_dir(KEY) / "field.png", tissue[:490, :631])  # odd leftover: 281 px
    settings = RoiSettings(size=350, jpeg_quality=100)
    result = run(roi_entry(crop={"fraction": 5 / 7}), layout, settings)
    (record,) = result.records
    pixels = read_rgb(tmp_path / record["path"])
    assert pixels.shape == (350, 350, 3)
    error = luma_error(pixels, tissue[70:420, 140:490])  # 5/7 of 490 = 350, centred
    assert error < 0.5
    assert luma_error(pixels, tissue[71:421, 140:490]) > 10 * error
    assert luma_error(pixels, tissue[70:420, 141:491]) > 10 * error


def test_large_and_rotated_images(tmp_path: Path, tissue: np.ndarray) -> None:
    """A whole-slide-sized JPEG (reduced by an integer factor first) and an EXIF-rotated JPEG."""
    with openslide.OpenSlide(TESTDATA / "CMU-1-Small-Region.svs") as slide:
        large = np.asarray(slide.read_region((0, 0), 0, (2220, 2967)).convert("RGB"))
    layout = DataLayout(tmp_path)
    save(layout.raw_dir(KEY) / "large.jpg", large, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are to be rotated 90 degrees clockwise
    save(layout.raw_dir(KEY) / "rotated.jpg", tissue[:300, :500], quality=95, exif=exif)
    result = run(roi_entry(), layout, RoiSettings(size=128))
    records = by_name(result.records)
    large_out = read_rgb(tmp_path / records["large"]["path"])
    assert luma_error(large_out, resized(large[373:2593], 128)) < 2
    upright = np.rot90(tissue[:300, :500], k=-1)  # 500 tall x 300 wide
    rotated_out = read_rgb(tmp_path / records["rotated"]["path"])
    assert luma_error(rotated_out, resized(np.ascontiguousarray(upright[100:400]), 128)) < 3
    assert luma_error(rotated_out, resized(tissue[:300, 100:400], 128)) > 10


def test_every_input_format_becomes_rgb(tmp_path: Path, tissue: np.ndarray) -> None:
    layout = DataLayout(tmp_path)
    source = layout.raw_dir(KEY)
    rgb = tissue[:240, :320]
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    grey16 = Image.fromarray(grey.astype(np.uint16) * 257)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :160, 3] = 0  # left half fully transparent
    palette = Image.fromarray(rgb).quantize(colors=64)
    save(source / "jpeg.jpg", rgb, quality=95)
    save(source / "bmp.bmp", rgb)
    save(source / "tiff.tiff", rgb)
    save(source / "palette.png", palette)
    save(source / "palette-transparent.png", palette, transparency=0)
    save(source / "rgba.png", rgba)
    save(source / "grey.png", grey)
    save(source / "grey16-png.png", grey16)
    save(source / "grey16-tiff.tif", grey16)
    rgb16 = pyvips.Image.new_from_array(rgb.astype(np.uint16) * 257).copy(interpretation="rgb16")
    rgb16.tiffsave(str(source / "rgb16.tif"))
    save(source / "tiny.png", rgb[:60, :90])

    result = run(roi_entry(), layout, RoiSettings(size=128))
    assert not result.failures
    records = by_name(result.records)
    outputs = {name: read_rgb(tmp_path / record["path"]) for name, record in records.items()}
    assert sorted(outputs) == sorted(path.stem for path in source.iterdir())
    assert all(pixels.shape == (128, 128, 3) for pixels in outputs.values())

    def expected(pixels: np.ndarray) -> np.ndarray:
        return resized(pixels[:, 40:280], 128)

    for name in ("jpeg", "bmp", "tiff", "rgb16", "palette", "grey", "grey16-png", "grey16-tiff"):
        assert luma_error(outputs[name], expected(rgb)) < 3, name
    for name in ("jpeg", "bmp", "tiff", "rgb16"):
        assert np.abs(outputs[name] - expected(rgb)).mean() < 8, name
    for name in ("grey", "grey16-png", "grey16-tiff"):
        assert np.abs(outputs[name][..., 0] - outputs[name][..., 2]).max() <= 4, name  # neutral
    on_white = rgb.copy()
    on_white[:, :160] = 255
    assert outputs["rgba"][:, :56].min() > 245  # the transparent half composited on white
    assert luma_error(outputs["rgba"], expected(on_white)) < 3
    palette_white = (outputs["palette-transparent"] > 245).all(axis=2).mean()
    assert palette_white > (outputs["palette"] > 245).all(axis=2).mean()
    assert records["tiny"]["upscaled"] is True
    assert [name for name, record in records.items() if record["upscaled"]] == ["tiny"]
    # 90x60: the centred 60 px square (columns 15-74) enlarged to 128
    tiny_expected = resized(rgb[:60, 15:75], 128)
    assert luma_error(outputs["tiny"], tiny_expected) < 3
    assert luma_error(outputs["tiny"], resized(rgb[:60, 16:76], 128)) > 1.5 * luma_error(
        outputs["tiny"], tiny_expected
    )


@pytest.mark.parametrize("key", ["demo-roi-cells", "demo-roi-tissue"])
def test_demo_labels_splits_and_scales_from_folders_and_csv(tmp_path: Path, key: str) -> None:
    """The demo's ROI entries: labels and splits from folders; from a CSV, with scale rules."""
    entry = load_catalog("demo").get(key)
    layout = DataLayout(tmp_path)
    generate_source(entry.source, layout.raw_dir(key))
    result = run(entry, layout, RoiSettings(size=96))
    assert not result.failures
    if key == "demo-roi-cells":  # <split>/<class>/<name>
        assert len(result.records) == 288  # 2 classes x (32 train + 16 val + 96 test)
        expected = {
            path.stem: (path.parent.name, path.parent.parent.name, "S")
            for path in find_roi_images(layout.raw_dir(key)).used
        }
    else:  # <magnification>/<name>, labels.csv
        assert len(result.records) == 24
        rows = (layout.raw_dir(key) / "labels.csv").read_text().splitlines()[1:]
        expected = {
            Path(image).stem: (label, split, "L" if image.startswith("40x/") else "M")
            for image, label, split in (row.split(",") for row in rows)
        }
    assert {r["image_name"]: (r["label"], r["split"], r["scale"]) for r in result.records} == (
        expected
    )
    for record in result.records:
        folder = "S" if key == "demo-roi-cells" else record["scale"]
        assert record["path"] == f"cpia/{folder}/{key}/{record['image_name']}.jpg"
        assert (tmp_path / record["path"]).is_file()


BREAKHIS_LIKE = """\
subdatasets:
- key: breakhis-like
  name: BreaKHis-like
  kind: roi
  organ: breast
  labelled: true
  source: {type: manual, landing_page: 'https://example.org/breakhis'}
  scale_rules:
  - {pattern: '-40-', scale: L}
  - {pattern: '-(100|200|400)-', scale: M}
  labels: {from: regex, pattern: 'SOB_(?P<value>[BM])_'}
  splits: {from: parent_folder, level: 1, map: {Training: train, Testing: test}}
"""


def test_regex_labels_mapped_splits_and_scale_rules(tmp_path: Path, tissue: np.ndarray) -> None:
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(BREAKHIS_LIKE)
    entry = load_catalog(catalog_path).get("breakhis-like")
    layout = DataLayout(tmp_path / "data")
    source = layout.raw_dir(entry.key)
    names = {
        "Training/SOB_B_A-14-22549AB-40-001.png": ("B", "train", "L"),
        "Training/SOB_M_DC-14-2523-100-007.png": ("M", "train", "M"),
        "Testing/SOB_B_F-14-9133-40-001.png": ("B", "test", "L"),
        "Testing/SOB_M_DC-14-2523-400-003.jpg": ("M", "test", "M"),
    }
    for index, name in enumerate(
        [*names, "Training/SOB_B_A-14-1-120-001.png", "Other/SOB_M_x-40-2.png"]
    ):
        save(source / name, tissue[index * 50 : index * 50 + 120, :150])
    result = run(entry, layout, RoiSettings(size=64))
    assert {
        r["source_file"].removeprefix(f"raw/{entry.key}/"): (r["label"], r["split"], r["scale"])
        for r in result.records
    } == names
    assert len(result.failures) == 1  # -120- has no scale: not used, not a failure, a skip
    assert result.skipped == [
        {
            "file": f"raw/{entry.key}/Training/SOB_B_A-14-1-120-001.png",
            "reason": "the catalog's scale rules give it no scale",
        }
    ]
    (bad,) = result.failures
    assert bad["file"] == f"raw/{entry.key}/Other/SOB_M_x-40-2.png"
    assert bad["stage"] == STAGE
    assert "'Other'" in bad["reason"] and "map" in bad["reason"]
    assert sorted(p.parent.name for p in (layout.root / "cpia").rglob("*.jpg")) == [entry.key] * 4
    assert {p.parts[-3] for p in (layout.root / "cpia").rglob("*.jpg")} == {"L", "M"}


def test_image_missing_from_the_label_csv_is_a_failure(tmp_path: Path, tissue: np.ndarray) -> None:
    layout = DataLayout(tmp_path)
    source = layout.raw_dir(KEY)
    for index in range(3):
        save(source / "images" / f"img{index}.png", tissue[:100, index * 100 : index * 100 + 100])
    (source / "meta.csv").write_text("file,diagnosis\nimg0.png,tumour\nimages/img1.png,normal\n")
    rule = {"from": "csv", "file": "meta.csv", "image_column": "file", "column": "diagnosis"}
    result = run(roi_entry(labels=rule), layout, RoiSettings(size=32))
    assert {r["image_name"]: r["label"] for r in result.records} == {
        "img0": "tumour",
        "img1": "normal",
    }
    (missing,) = result.failures
    assert missing["file"] == f"raw/{KEY}/images/img2.png"
    assert result.skipped == [
        {"file": f"raw/{KEY}/meta.csv", "reason": "label or split table of the catalog"}
    ]
    assert "labels rule (from csv) gives no value" in missing["reason"]
    assert not (tmp_path / f"cpia/M/{KEY}/img2.jpg").exists()


def test_sicapv2_partition_workbooks_label_and_split_the_patches(
    tmp_path: Path, tissue: np.ndarray
) -> None:
    """The cpia.yaml entry on SICAPv2's layout: workbooks skipped as tables, masks not used,
    patches no workbook lists kept for pre-training without a label."""
    entry = load_catalog("cpia").get("sicapv2")
    layout = DataLayout(tmp_path)
    root = layout.raw_dir(entry.key) / "SICAPv2"
    for index, name in enumerate(["p0", "p1", "p2"]):
        save(root / "images" / f"{name}.jpg", tissue[:100, index * 100 : index * 100 + 100])
    save(root / "masks" / "p0.png", np.zeros((100, 100), dtype=np.uint8))
    header = ["image_name", "NC", "G3", "G4", "G5", "G4C"]
    write_xlsx(root / "partition/Test/Train.xlsx", [header, ["p0.jpg", 0, 1, 0, 0, 0]])
    write_xlsx(root / "partition/Test/Test.xlsx", [header, ["p1.jpg", 0, 0, 0, 1, 0]])
    result = run(entry, layout, RoiSettings(size=32))
    assert {r["image_name"]: (r["label"], r["split"]) for r in result.records} == {
        "p0": ("G3", "train"),
        "p1": ("G5", "test"),
        "p2": (None, "none"),
    }
    assert result.failures == []
    assert {row["file"].split("SICAPv2/")[1]: row["reason"] for row in result.skipped} == {
        "masks/p0.png": "the catalog's scale rules give it no scale",
        "partition/Test/Test.xlsx": "label or split table of the catalog",
        "partition/Test/Train.xlsx": "label or split table of the catalog",
    }


def test_colliding_names_are_disambiguated_deterministically(
    tmp_path: Path, tissue: np.ndarray
) -> None:
    layout = DataLayout(tmp_path)
    source = layout.raw_dir(KEY)
    crops = {
        "a/x.png": tissue[:200, :200],
        "b/x.png": tissue[200:400, :200],
        "c/X.jpg": tissue[400:600, :200],
        "c/y.png": tissue[600:800, :200],
    }
    for name, pixels in crops.items():
        save(source / name, pixels)

    def tag(relative: str) -> str:
        return hashlib.sha1(relative.encode()).hexdigest()[:8]

    expected_names = {
        "a/x.png": f"x__{tag('a/x.png')}",
        "b/x.png": f"x__{tag('b/x.png')}",
        "c/X.jpg": f"X__{tag('c/X.jpg')}",
        "c/y.png": "y",
    }
    assert output_stems(crops) == expected_names
    first = run(roi_entry(), layout, RoiSettings(size=200, jpeg_quality=95))
    second = run(roi_entry(), layout, RoiSettings(size=200, jpeg_quality=95))
    assert first.records == second.records
    assert second.reused == 4
    records = {r["source_file"].removeprefix(f"raw/{KEY}/"): r for r in first.records}
    assert {relative: r["image_name"] for relative, r in records.items()} == expected_names
    for relative, pixels in crops.items():  # each output holds its own source's pixels
        assert luma_error(read_rgb(tmp_path / records[relative]["path"]), pixels) < 3
    assert len(list((tmp_path / f"cpia/M/{KEY}").iterdir())) == 4


def reference_square(path: Path, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """The standardized square as Pillow computes it from the fully decoded, upright image."""
    with Image.open(path) as image:
        upright = to_rgb(ImageOps.exif_transpose(image))
    square, _ = standardize_image(upright, size=size, crop_fraction=crop_fraction)
    return np.asarray(square, dtype=np.float64)


def test_streamed_decoding_matches_a_full_decode(tmp_path: Path, tissue: np.ndarray) -> None:
    """Large squares go through libvips (a row stream, JPEG shrunk on load); the result stays
    within a small tolerance of Pillow's full decode, for every format path."""
    big = np.asarray(Image.fromarray(tissue).resize((1700, 2550)))  # 2x 640 x 960 of real tissue
    rgba = np.dstack([big, np.full(big.shape[:2], 255, np.uint8)])
    rgba[:, :850, 3] = 0  # left half transparent: composited on white
    sources = {
        "shrunk.jpg": save(tmp_path / "shrunk.jpg", big, quality=95),  # 1700 >= 16 * 2 * 48
        "rgba.png": save(tmp_path / "rgba.png", rgba),
        "grey16.png": save(
            tmp_path / "grey16.png", Image.fromarray(big[..., 1].astype(np.uint16) * 257)
        ),
    }
    for name, path in sources.items():
        for size, fraction in ((48, 1.0), (200, 5 / 7)):
            square, upscaled = load_square(
                path, size=size, crop_fraction=fraction, max_pixels=10**8
            )
            pixels = np.asarray(square, dtype=np.float64)
            assert pixels.shape == (size, size, 3) and not upscaled
            expected = reference_square(path, size, fraction)
            assert np.abs(pixels - expected).mean() < 1.5, (name, size)
    with Image.open(sources["rgba.png"]) as image:
        assert image.size == (1700, 2550)
    square, _ = load_square(sources["rgba.png"], size=48, max_pixels=10**8)
    assert np.asarray(square)[:, :23].min() > 250  # the transparent left half is white


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_crops_the_upright_centre(
    tmp_path: Path, tissue: np.ndarray, orientation: int
) -> None:
    """501 x 300 stored pixels: an odd leftover, which must fall right and below once upright."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "oriented.jpg", tissue[:300, :501], quality=95, exif=exif)
    square, _ = load_square(path, size=100, max_pixels=10**6)
    pixels = np.asarray(square, dtype=np.float64)
    error = luma_error(pixels, reference_square(path, 100))
    assert error < 1, orientation
    with Image.open(path) as image:
        upright = np.asarray(to_rgb(ImageOps.exif_transpose(image)))
    height, width = upright.shape[:2]
    side = min(width, height)
    left, top = (width - side) // 2 + 1, (height - side) // 2 + (height > width)
    shifted = resized(np.ascontiguousarray(upright[top : top + side, left : left + side]), 100)
    assert luma_error(pixels, shifted) > 3 * error


def test_images_over_the_pixel_limit_fail_with_the_setting(
    tmp_path: Path, tissue: np.ndarray
) -> None:
    layout = DataLayout(tmp_path)
    save(layout.raw_dir(KEY) / "big.png", tissue)  # 640 x 960 = 614,400 pixels
    save(layout.raw_dir(KEY) / "big.bmp", tissue)  # decoded by Pillow
    save(layout.raw_dir(KEY) / "small.png", tissue[:500, :500])
    result = run(roi_entry(), layout, RoiSettings(size=64, max_pixels=600_000))
    assert [r["image_name"] for r in result.records] == ["small"]
    assert [(Path(f["file"]).name, f["reason"].split(": ", 1)[1]) for f in result.failures] == [
        (name, "640x960 = 614,400 pixels, over the limit of 600,000 "
               "(roi.max_pixels in the run config of standardized_wsi)")
        for name in ("big.bmp", "big.png")
    ]  # fmt: skip
    assert len(run(roi_entry(), layout, RoiSettings(size=64, max_pixels=614_400)).records) == 3
    with pytest.raises(ValueError, match="max_pixels >= 1"):
        RoiSettings(max_pixels=0)


def test_truncated_large_images_fail_instead_of_going_grey(
    tmp_path: Path, tissue: np.ndarray
) -> None:
    layout = DataLayout(tmp_path)
    source = layout.raw_dir(KEY)
    for name in ("cut.jpg", "cut.png"):
        whole = save(source / name, tissue, **({"quality": 90} if name.endswith("jpg") else {}))
        data = whole.read_bytes()
        whole.write_bytes(data[: len(data) * 2 // 3])
    save(source / "whole.jpg", tissue, quality=90)
    result = run(roi_entry(), layout, RoiSettings(size=64))
    assert [r["image_name"] for r in result.records] == ["whole"]
    assert sorted(Path(f["file"]).name for f in result.failures) == ["cut.jpg", "cut.png"]
    assert all("cannot decode image" in f["reason"] for f in result.failures)


def test_corrupt_images_are_recorded_and_skipped(tmp_path: Path, tissue: np.ndarray) -> None:
    layout = DataLayout(tmp_path)
    source = layout.raw_dir(KEY)
    save(source / "good.jpg", tissue[:200, :300], quality=90)
    save(source / "also-good.png", tissue[200:400, :300])
    whole = (source / "good.jpg").read_bytes()
    (source / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (source / "empty.png").write_bytes(b"")
    (source / "text.png").write_text("this is a README, not a PNG\n")
    result = run(roi_entry(), layout)
    assert sorted(r["image_name"] for r in result.records) == ["also-good", "good"]
    reasons = {Path(row["file"]).name: row["reason"] for row in result.failures}
    assert set(reasons) == {"truncated.jpg", "empty.png", "text.png"}
    assert "truncated" in reasons["truncated.jpg"]
    assert all(f"raw/{KEY}/{name}" in reason for name, reason in reasons.items())
    assert all("cannot decode image" in reason for reason in reasons.values())
    assert {row["stage"] for row in result.failures} == {STAGE}
    assert sorted(p.name for p in (tmp_path / f"cpia/M/{KEY}").iterdir()) == [
        "also-good.jpg",
        "good.jpg",
    ]


def test_a_rerun_with_verified_download_digests_reads_no_unchanged_source(
    tmp_path: Path, tissue: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = DataLayout(tmp_path)
    source = layout.raw_dir(KEY)
    for index in range(3):
        save(source / f"img{index}.png", tissue[index * 200 : index * 200 + 160, :200])
    state = DownloadState(dest=source)
    for path in sorted(source.iterdir()):
        state.record(path.name, sha256=sha256_file(path), source="local", owned=False)
    state.save()
    first = run(roi_entry(), layout, known_sha256=verified_digests(source))
    save(source / "img0.png", tissue[800:960, 300:500])  # changed after the download verified it

    hashed: list[str] = []

    def counted(path: Path) -> str:
        hashed.append(path.name)
        return sha256_file(path)

    monkeypatch.setattr(roi_standardize, "sha256_file", counted)
    again = run(roi_entry(), layout, known_sha256=verified_digests(source))
    assert hashed == ["img0.png"]
    assert again.reused == 2
    assert {r["image_name"]: r["source_sha256"] for r in again.records} == {
        path.stem: sha256_file(path) for path in source.glob("*.png")
    }
    assert first.records[1:] == again.records[1:]


def test_rerun_reuses_updates_and_cleans_up(tmp_path: Path, tissue: np.ndarray) -> None:
    layout = DataLayout(tmp_path)
    source = layout.raw_dir(KEY)
    for index in range(4):
        save(source / f"img{index}.png", tissue[index * 200 : index * 200 + 160, :200])
    settings = RoiSettings(size=96)
    first = run(roi_entry(), layout, settings)
    outputs = tmp_path / f"cpia/M/{KEY}"
    stamps = {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()}

    again = run(roi_entry(), layout, settings)
    assert again.reused == 4
    assert again.records == first.records
    assert {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()} == stamps

    save(source / "img0.png", tissue[800:960, 300:500])  # new pixels, same name
    (source / "img1.png").unlink()
    (source / "img2.png").write_bytes(b"\x89PNG broken")  # now corrupt: its old output goes too
    (outputs / ".img3.jpg.x1y2.tmp").mkdir()  # left by an interrupted run
    (outputs / "ghost.jpg").write_bytes(b"stale")
    changed = run(roi_entry(), layout, settings)
    assert changed.reused == 1
    assert [r["image_name"] for r in changed.records] == ["img0", "img3"]
    assert [Path(row["file"]).name for row in changed.failures] == ["img2.png"]
    assert sorted(p.name for p in outputs.iterdir()) == ["img0.jpg", "img3.jpg"]
    assert (outputs / "img3.jpg").stat().st_mtime_ns == stamps["img3.jpg"]
    img0 = changed.records[0]
    assert img0["source_sha256"] == sha256_file(source / "img0.png")
    assert luma_error(read_rgb(outputs / "img0.jpg"), resized(tissue[800:960, 320:480], 96)) < 3

    requality = run(roi_entry(), layout, RoiSettings(size=96, jpeg_quality=60))
    assert requality.reused == 0
    assert all(
        r["bytes"] < o["bytes"] for r, o in zip(requality.records, changed.records, strict=True)
    )

    rescaled = run(roi_entry(scale="S"), layout, settings)
    assert rescaled.reused == 0
    assert [r["path"] for r in rescaled.records] == [
        f"cpia/S/{KEY}/img0.jpg",
        f"cpia/S/{KEY}/img3.jpg",
    ]
    assert not outputs.exists()  # moved to S: the emptied M folder is gone
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_records_hold_the_hash_of_the_pixels_and_older_outputs_are_redone(
    tmp_path: Path, tissue: np.ndarray
) -> None:
    """The pHash of the square before encoding (near the saved JPEG's), read back from the
    stamp on a rerun; an output stamped before hashes existed is encoded again."""
    layout = DataLayout(tmp_path)
    source = layout.raw_dir(KEY)
    save(source / "shrunk.png", tissue[:640, :640])
    save(source / "enlarged.png", tissue[:200, 300:600])
    first = run(roi_entry(), layout)
    records = by_name(first.records)
    square, _ = load_square(source / "shrunk.png", size=384, max_pixels=RoiSettings().max_pixels)
    assert records["shrunk"]["phash"] == phash(square)
    for record in first.records:
        written = phash_file(tmp_path / record["path"])
        assert hamming(record["phash"], written) <= NEAR_DUPLICATE_BITS, record["image_name"]
    assert hamming(records["shrunk"]["phash"], records["enlarged"]["phash"]) > NEAR_DUPLICATE_BITS
    again = run(roi_entry(), layout)
    assert again.reused == 2 and again.records == first.records

    output = tmp_path / records["enlarged"]["path"]
    with Image.open(output) as image:
        stamp = json.loads(image.info["comment"])
        del stamp["phash"]
        image.save(output, quality=90, comment=json.dumps(stamp))
    redone = run(roi_entry(), layout)
    assert redone.reused == 1 and redone.records == first.records


def test_process_pool_gives_the_same_records(tmp_path: Path, tissue: np.ndarray) -> None:
    settings = RoiSettings(size=64, chunk_size=2)
    results = []
    messages: list[str] = []
    for folder in ("serial", "pool"):
        layout = DataLayout(tmp_path / folder)
        for index in range(6):
            save(
                layout.raw_dir(KEY) / f"c{index}.png", tissue[index * 150 : index * 150 + 140, :180]
            )
        if folder == "serial":
            results.append(run(roi_entry(), layout, settings))
            continue
        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
            results.append(
                run(roi_entry(), layout, settings, executor=pool, progress=messages.append)
            )
    serial, pooled = results
    assert len(serial.records) == 6
    assert pooled.records == serial.records
    assert len(messages) == 3
    assert messages[-1] == f"{KEY}: 6/6 images, 0 reused, 0 failed"


WBC_LIKE = """\
subdatasets:
- key: wbc-like
  name: WBC-like
  kind: roi
  organ: blood
  scale: S
  labelled: true
  labels: {from: parent_folder, level: 1}
  splits: {from: parent_folder, level: 2, map: {Train: train, TestA: test}}
  source: {type: manual, landing_page: 'https://example.org/raabin-wbc'}
"""


def test_an_official_split_without_val_gets_one_carved_from_train_in_the_records(
    tmp_path: Path, tissue: np.ndarray
) -> None:
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(WBC_LIKE)
    entry = load_catalog(catalog_path).get("wbc-like")
    layout = DataLayout(tmp_path / "data")
    for label in ("Basophil", "Monocyte"):
        for split, count in (("Train", 12), ("TestA", 3)):
            for number in range(count):
                crop = tissue[number * 40 : number * 40 + 64, :64]
                save(layout.raw_dir(entry.key) / split / label / f"{number}.png", crop)
    records = run(entry, layout, RoiSettings(size=32)).records
    placed = {(r["label"], r["source_file"].split("/")[2], r["split"]) for r in records}
    assert placed == {
        (label, folder, split)
        for label in ("Basophil", "Monocyte")
        for folder, split in (("Train", "train"), ("Train", "val"), ("TestA", "test"))
    }
    carved = [r for r in records if r["split"] == "val"]
    assert sorted(r["label"] for r in carved) == ["Basophil"] * 2 + ["Monocyte"] * 2  # 10:2
    assert [r["split"] for r in run(entry, layout, RoiSettings(size=32)).records] == [
        r["split"] for r in records
    ]  # the same images every time
