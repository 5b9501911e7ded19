"""The export's own guarantees on real files: one key per image name, every image checked and
present or nothing published, the seed's shuffle, every sidecar field, re-export on any changed
input, and a re-export killed mid-swap that the next one repairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from PIL import Image

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training import shards
from cpia_assets.core.training.shards import (
    INDEX_FILE,
    ShardSettings,
    export_shards,
    sample_key,
)

NAMES = ("cell.1", "cell_1", "cell%2E1", "cell-1", "cell.1.a", "cell_1_a")
"""Distinct names that a lossy key (dots to '_', or dots dropped) would merge."""


def _images(layout: DataLayout, names: tuple[str, ...] = NAMES) -> list[dict[str, Any]]:
    """One small JPEG per name under cpia/S/set/, and its sidecar."""
    sidecars = []
    for index, name in enumerate(names):
        path = layout.root / "cpia" / "S" / "set" / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (index * 30, 90, 0)).save(path, quality=90)
        sidecars.append({"image_name": name, "subdataset": "set", "organ": "blood", "scale": "S",
                         "folder": "S", "label": f"class-{index % 2}", "split": "train",
                         "source_tile": None, "path": layout.relative(path)})  # fmt: skip
    return sidecars


def _export(layout: DataLayout, sidecars: list[dict[str, Any]], **settings: Any):
    return export_shards(sidecars, variant="cpia-s", layout=layout,
                         settings=ShardSettings(**{"shard_size": 4} | settings))  # fmt: skip


def _samples(folder: Path) -> list[tuple[str, dict[str, Any], bytes]]:
    """(key, sidecar, image bytes) of every sample, in shard order, read with webdataset."""
    index = json.loads((folder / INDEX_FILE).read_text())
    urls = [str(folder / shard["file"]) for shard in index["shards"]]
    return [
        (sample["__key__"], json.loads(sample["json"]), sample["jpg"])
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    ]


def test_names_differing_by_dot_or_underscore_get_their_own_readable_keys(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    result = _export(layout, _images(layout))
    assert result.written and not result.failures
    read = {key: meta["image_name"] for key, meta, _ in _samples(layout.shards_dir("cpia-s"))}
    assert sorted(read.values()) == sorted(NAMES)  # each image once, under its own key
    assert read["set__S__cell%2E1"] == "cell.1" and read["set__S__cell_1"] == "cell_1"
    assert all("." not in key for key in read)
    assert len({sample_key("set", "S", name) for name in NAMES}) == len(NAMES)


def test_every_sidecar_field_travels_with_its_image(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    sidecars = _images(layout)
    _export(layout, sidecars)
    by_name = {sidecar["image_name"]: sidecar for sidecar in sidecars}
    for _, meta, image in _samples(layout.shards_dir("cpia-s")):
        assert meta == by_name[meta["image_name"]]
        assert image == (layout.root / meta["path"]).read_bytes()


def test_the_shuffle_follows_the_seed(tmp_path: Path) -> None:
    many = tuple(f"img-{i:02d}" for i in range(24))
    orders = {}
    for seed in (0, 0, 1):
        layout = DataLayout(tmp_path / f"seed-{seed}")
        _export(layout, _images(layout, many), seed=seed)
        order = [meta["image_name"] for _, meta, _ in _samples(layout.shards_dir("cpia-s"))]
        assert orders.setdefault(seed, order) == order  # the same seed, the same order
    assert sorted(orders[0]) == sorted(many) and orders[0] != sorted(many)
    assert orders[1] != orders[0]


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.tar"))}


@pytest.mark.parametrize("change", ["image bytes", "image mtime", "label", "settings"])
def test_any_changed_input_is_exported_again(tmp_path: Path, change: str) -> None:
    layout = DataLayout(tmp_path)
    sidecars = _images(layout)
    settings: dict[str, Any] = {}
    _export(layout, sidecars)
    assert not _export(layout, sidecars).written  # unchanged: nothing written
    target = layout.root / sidecars[0]["path"]
    if change == "image bytes":
        Image.new("RGB", (16, 16), (0, 0, 250)).save(target, quality=90)
    elif change == "image mtime":
        os.utime(target, ns=(1, 1))
    elif change == "label":
        sidecars[0]["label"] = "another class"
    else:
        settings = {"seed": 7}
    again = _export(layout, sidecars, **settings)
    assert again.written, change
    samples = {meta["image_name"]: (meta, image) for _, meta, image in
               _samples(layout.shards_dir("cpia-s"))}  # fmt: skip
    meta, image = samples[sidecars[0]["image_name"]]
    assert meta == sidecars[0] and image == target.read_bytes()


def test_a_missing_or_damaged_image_is_named_and_nothing_is_published(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    sidecars = _images(layout)
    _export(layout, sidecars)
    folder = layout.shards_dir("cpia-s")
    published = _shard_bytes(folder)
    missing, garbage, truncated = (layout.root / sidecars[i]["path"] for i in (1, 2, 3))
    missing.unlink()
    garbage.write_bytes(os.urandom(garbage.stat().st_size))  # same size, other bytes
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    result = _export(layout, sidecars)
    reasons = {f["file"]: f["reason"] for f in result.failures}
    assert sorted(reasons) == sorted(layout.relative(p) for p in (missing, garbage, truncated))
    assert "cannot read the image" in reasons[layout.relative(missing)]
    assert "not a whole JPEG" in reasons[layout.relative(garbage)]
    assert "not a whole JPEG" in reasons[layout.relative(truncated)]
    assert not result.written and _shard_bytes(folder) == published  # the old export stays
    assert [p.name for p in folder.parent.iterdir()] == ["cpia-s"]  # no staging left


def test_an_export_whose_images_are_all_gone_counts_them_and_lists_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "LISTED_FAILURES", 4)  # no executor: the shards run in-process
    layout = DataLayout(tmp_path)
    sidecars = _images(layout, tuple(f"cell-{n:02d}" for n in range(10)))
    for sidecar in sidecars:
        (layout.root / sidecar["path"]).unlink()
    result = _export(layout, sidecars, shard_size=6)  # 6 + 4 failures, each shard lists 4
    assert result.failed == 10 and not result.written
    listed = [f["file"] for f in result.failures]
    assert len(set(listed)) == 4 and set(listed) <= {s["path"] for s in sidecars}
    assert all("cannot read the image" in f["reason"] for f in result.failures)
    samples = [(s["image_name"], s["path"], "S", "{}") for s in sidecars]
    one = shards._write_shard(shards._ShardJob(tmp_path / "one.tar", layout.root, samples))
    assert (one.failed, len(one.failures)) == (10, 4)  # a worker returns no more either


KILLED_EXPORT = """
import json, os, signal, sys
from pathlib import Path
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training import shards

moment, root, sidecars = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
if moment == "mid-swap":  # killed just before the new export is moved into place
    def then_die(move):
        def moved(self, target):
            if Path(target).name == "cpia-s":
                os.kill(os.getpid(), signal.SIGKILL)
            return move(self, target)
        return moved
    Path.rename, Path.replace = then_die(Path.rename), then_die(Path.replace)
else:  # killed while the second shard is being written
    write = shards._write_shard
    def write_then_die(job):
        if job.file.name == "shard-000001.tar":
            os.kill(os.getpid(), signal.SIGKILL)
        return write(job)
    shards._write_shard = write_then_die
shards.export_shards(sidecars, variant="cpia-s", layout=DataLayout(root),
                     settings=shards.ShardSettings(shard_size=4, seed=1))
"""


@pytest.mark.parametrize("moment", ["mid-swap", "writing shards"])
def test_a_killed_re_export_leaves_a_whole_export_and_the_rerun_cleans_up(
    tmp_path: Path, moment: str
) -> None:
    layout = DataLayout(tmp_path)
    sidecars = _images(layout, tuple(f"img-{i:02d}" for i in range(10)))
    _export(layout, sidecars)
    folder = layout.shards_dir("cpia-s")
    first = _shard_bytes(folder)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, moment, str(tmp_path), json.dumps(sidecars)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(path.name for path in folder.parent.iterdir())
    assert left != ["cpia-s"]  # the kill left its folders behind
    # a complete export is on disk under the visible name or aside, never a half-deleted one
    whole = folder if folder.is_dir() else folder.with_name(".cpia-s.aside")
    assert _shard_bytes(whole) == first
    result = _export(layout, sidecars, seed=1)
    assert result.written and not result.failures
    assert [path.name for path in folder.parent.iterdir()] == ["cpia-s"]
    index = json.loads((folder / INDEX_FILE).read_text())
    assert sorted(path.name for path in folder.glob("*.tar")) == [
        s["file"] for s in index["shards"]
    ]
    assert sorted(meta["image_name"] for _, meta, _ in _samples(folder)) == sorted(
        s["image_name"] for s in sidecars
    )
    with tarfile.open(folder / index["shards"][0]["file"]) as tar:
        assert len(tar.getnames()) == 2 * index["shards"][0]["images"]
