"""PCam-style HDF5 patch arrays (.h5 and .h5.gz), built in the test, become ROI images."""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from PIL import Image

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.roi.patch_arrays import unpack_patch_arrays
from cpia_assets.core.roi.standardize import STAGE
from cpia_assets_tests.core.roi.test_roi import KEY, roi_entry, run
from cpia_assets_tests.support.paths import TESTDATA

PREFIX = "camelyonpatch_level_2_split"


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    """Eight 96 px RGB patches of real H&E (CMU-1-Small-Region)."""
    with openslide.OpenSlide(TESTDATA / "CMU-1-Small-Region.svs") as slide:
        region = np.asarray(slide.read_region((900, 1900), 0, (384, 192)).convert("RGB"))
    return np.stack([region[r : r + 96, c : c + 96] for r in (0, 96) for c in range(0, 384, 96)])


def write_h5(path: Path, name: str, data: np.ndarray, *, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_name(path.name.removesuffix(".gz"))
    with h5py.File(plain, "w") as handle:
        handle.create_dataset(name, data=data, chunks=True)
    if gz:
        with plain.open("rb") as source, gzip.open(path, "wb") as target:
            target.write(source.read())
        plain.unlink()
    return path


@pytest.fixture
def pcam(tmp_path: Path, patches: np.ndarray) -> DataLayout:
    """train: x and y gzipped (5 patches); valid: plain .h5 (3 patches); a corrupt .h5.gz."""
    layout = DataLayout(tmp_path / "data")
    raw = layout.raw_dir(KEY)
    write_h5(raw / f"{PREFIX}_train_x.h5.gz", "x", patches[:5], gz=True)
    write_h5(raw / f"{PREFIX}_train_y.h5.gz", "y",
             np.array([0, 1, 1, 0, 1], np.uint8).reshape(5, 1, 1, 1), gz=True)  # fmt: skip
    write_h5(raw / f"{PREFIX}_valid_x.h5", "x", patches[5:], gz=False)
    write_h5(raw / f"{PREFIX}_valid_y.h5", "y", np.array([[1], [0], [0]], np.uint8), gz=False)
    (raw / "broken_x.h5.gz").write_bytes(gzip.compress(b"not an HDF5 file"))
    return layout


def test_pcam_partition_produces_labelled_images_from_the_arrays(
    pcam: DataLayout, patches: np.ndarray
) -> None:
    entry = roi_entry(
        labelled=True,
        labels={"from": "parent_folder", "level": 1, "map": {"0": "normal", "1": "tumour"}},
        splits={"from": "regex", "pattern": "_split_(?P<value>train|valid)_",
                "map": {"train": "train", "valid": "val"}},
    )  # fmt: skip
    result = run(entry, pcam)
    assert [row["file"] for row in result.failures] == [f"raw/{KEY}/broken_x.h5.gz"]
    assert "not a readable HDF5 file" in result.failures[0]["reason"]
    assert result.failures[0]["stage"] == STAGE
    records = {row["source_file"]: row for row in result.records}
    unpacked = f"unpacked/{KEY}"
    assert sorted(records) == sorted(
        [f"{unpacked}/{PREFIX}_train_x/{label}/{index}.png"
         for index, label in enumerate([0, 1, 1, 0, 1])]
        + [f"{unpacked}/{PREFIX}_valid_x/{label}/{index}.png"
           for index, label in enumerate([1, 0, 0])]
    )  # fmt: skip
    train_2 = records[f"{unpacked}/{PREFIX}_train_x/1/2.png"]
    assert (train_2["label"], train_2["split"], train_2["scale"]) == ("tumour", "train", "M")
    assert train_2["upscaled"] is True  # 96 px patches enlarged to 384
    valid_0 = records[f"{unpacked}/{PREFIX}_valid_x/1/0.png"]
    assert (valid_0["label"], valid_0["split"]) == ("tumour", "val")
    # The unpacked PNG is the array's patch, bit for bit; the JPEG is that patch enlarged.
    with Image.open(pcam.root / train_2["source_file"]) as png:
        assert np.array_equal(np.asarray(png), patches[2])
    with Image.open(pcam.root / train_2["path"]) as jpeg:
        assert jpeg.size == (384, 384)
        small = np.asarray(jpeg.resize((96, 96), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(small - patches[2]).mean() < 6


def test_unpacking_resumes_and_follows_source_changes(pcam: DataLayout, patches: np.ndarray):
    raw, unpacked = pcam.raw_dir(KEY), pcam.unpacked_dir(KEY)

    def unpack() -> list[dict[str, str]]:
        return unpack_patch_arrays(raw, unpacked, stage=STAGE, stored_prefix=f"raw/{KEY}")

    assert len(unpack()) == 1  # the broken file
    train = unpacked / f"{PREFIX}_train_x"
    first = {path: path.stat().st_mtime_ns for path in train.rglob("*.png")}
    assert len(first) == 5
    unpack()
    assert {path: path.stat().st_mtime_ns for path in train.rglob("*.png")} == first  # reused
    # New labels: the patches move to their new label folders.
    write_h5(raw / f"{PREFIX}_train_y.h5.gz", "y", np.ones((5, 1, 1, 1), np.uint8), gz=True)
    unpack()
    assert sorted(p.relative_to(train).as_posix() for p in train.rglob("*.png")) == [
        f"1/{index}.png" for index in range(5)
    ]
    # A label file with the wrong length fails that array only; a removed array is cleaned up.
    write_h5(raw / f"{PREFIX}_valid_y.h5", "y", np.zeros((7, 1), np.uint8), gz=False)
    (raw / f"{PREFIX}_train_x.h5.gz").unlink()
    failures = {row["file"]: row["reason"] for row in unpack()}
    assert "holds 7 x 1 values for 3 patches" in failures[f"raw/{KEY}/{PREFIX}_valid_x.h5"]
    assert not (unpacked / f"{PREFIX}_valid_x").exists()  # its earlier patches are not reused
    assert not train.exists() and not train.with_name(train.name + ".json").exists()
    assert not list(unpacked.rglob(".gunzip-*"))  # no scratch files left behind
