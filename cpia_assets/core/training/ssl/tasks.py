"""The labelled tasks of the downstream evaluation, and the images each split holds.

A task is a catalog key or a folder:
- **A catalog key** (`tasks: {wbc: wbc}`): the sub-dataset's standardized images with the label
  and split its records hold. That is the split Mini and every export hold out (val/test, and any
  validation part carved from train, `catalog/splits.py`), so no evaluation image is pre-trained
  on.
- **A folder** (an ImageFolder outside the data): `<split>/<class>/*` with train and test (val
  carved from train when missing), or `<class>/*` split 7:1:2 per class, with the same split
  functions. Split folders are recognised in any case and common spellings (`Train`, `valid`);
  a folder whose layout is neither (split folders beside others, train and val without test) is
  refused, since taking split folders for classes would fine-tune on the test images. A folder
  inside a sub-dataset's raw folder is refused: its split would differ from the one Mini holds
  out.

Every image is decoded in full when the task loads (PIL's `verify()` passes truncated files);
one that fails is listed in the task's failures and left out.

Each task also names where its images come from as exclusion rules (`sources`): declared in
FinetuneSettings.task_sources, else the paper's for WBC, pRCC and CAM16.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from PIL import Image

from cpia_assets.core.catalog.model import Catalog
from cpia_assets.core.catalog.splits import carve_validation, stratified_split
from cpia_assets.core.fsutil import atomic_path
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.exclusions import PAPER_TASK_SOURCES

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
SPLIT_FOLDER_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                      "validation": "val", "test": "test", "testing": "test"}  # fmt: skip
"""An ImageFolder's split folders, by lower-cased name."""
SPLITS_FILE = "splits.csv"


@dataclass
class LabelledTask:
    name: str
    origin: str  # the catalog key or the folder
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    failures: list[dict[str, str]]  # unreadable images, left out: {"file", "reason"}
    sources: tuple[str, ...] = ()  # exclusion rules naming what the images come from
    hashes: dict[Path, int] = field(default_factory=dict)  # perceptual hashes from the records

    @property
    def evaluation_images(self) -> list[Path]:
        """The images that must never be pre-trained on: val and test."""
        return [path for split in ("val", "test") for path, _ in self.splits[split]]


def task_sources(name: str, declared: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The declared source rules of a task, else the paper's for its name (case-insensitive)."""
    if name in declared:
        return tuple(declared[name])
    paper = {task.lower(): rules for task, rules in PAPER_TASK_SOURCES.items()}
    return paper.get(name.lower(), ())


def load_task(
    name: str,
    origin: str,
    *,
    layout: DataLayout,
    catalog: Catalog,
    seed: int = 0,
    sources: tuple[str, ...] = (),
) -> LabelledTask:
    """The task `name` from a catalog key's records or from an ImageFolder."""
    if origin in catalog.keys:
        task = _catalog_task(name, origin, layout)
    else:
        folder = Path(origin)
        for key in catalog.keys:
            if folder.resolve().is_relative_to(layout.raw_dir(key).resolve()):
                raise ValueError(
                    f"task {name!r}: {folder} lies in the source of sub-dataset {key!r}; use the "
                    f"key ({name}: {key}) so that the evaluation and Mini share its split"
                )
        task = load_folder_task(name, folder, seed)
    task.sources = sources
    return task


def _catalog_task(name: str, key: str, layout: DataLayout) -> LabelledTask:
    records = layout.manifest_file(key, "tiles")
    if not records.is_file():
        raise FileNotFoundError(f"task {name!r}: {records} is missing: materialize {key!r} first")
    rows = pl.read_parquet(records).filter(
        pl.col("path").is_not_null() & pl.col("label").is_not_null() & pl.col("split").is_in(SPLITS)
    )
    failures: list[dict[str, str]] = []
    readable = []
    for row in rows.sort("path").iter_rows(named=True):
        path = layout.root / row["path"]
        if _decodes(path, failures):
            readable.append((path, row))
    classes = sorted({row["label"] for _, row in readable})
    if len(classes) < 2:
        raise ValueError(f"task {name!r}: {key!r} has fewer than two labels in train/val/test")
    splits: dict[str, list[tuple[Path, int]]] = {split: [] for split in SPLITS}
    hashes = {}
    for path, row in readable:
        splits[row["split"]].append((path, classes.index(row["label"])))
        if row.get("phash") is not None:
            hashes[path] = row["phash"]
    _check_splits(name, key, splits)
    return LabelledTask(name, key, classes, splits, failures, hashes=hashes)


def load_folder_task(name: str, root: Path, seed: int = 0) -> LabelledTask:
    """The labelled images of an ImageFolder task, split as given or 7:1:2 per class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"task {name!r}: {root} is not a folder")
    failures: list[dict[str, str]] = []
    split_folders = _split_folders(name, root)
    if split_folders:
        labelled = {
            path: (label, split)
            for split, folder in split_folders.items()
            for path, label in _class_images(folder, failures)
        }
        assigned = carve_validation(
            ((str(path), label, split) for path, (label, split) in labelled.items()), seed=seed
        )
    else:
        labelled = {path: (label, "") for path, label in _class_images(root, failures)}
        assigned = stratified_split(
            ((str(path), label) for path, (label, _) in labelled.items()), seed=seed
        )
    classes = sorted({label for label, _ in labelled.values()})
    if len(classes) < 2:
        raise ValueError(f"task {name!r}: {root} has fewer than two class folders with images")
    splits: dict[str, list[tuple[Path, int]]] = {split: [] for split in SPLITS}
    for path, (label, _) in sorted(labelled.items()):
        splits[assigned[str(path)]].append((path, classes.index(label)))
    _check_splits(name, str(root), splits)
    return LabelledTask(name, str(root), classes, splits, failures)


def _split_folders(name: str, root: Path) -> dict[str, Path]:
    """The split folders of an ImageFolder task by split, empty when it is `<class>/*`. Refused
    when ambiguous: split folders beside other folders, two folders for one split, or no train
    and test folder."""
    folders = sorted(path for path in root.iterdir() if path.is_dir())
    named = {path: SPLIT_FOLDER_NAMES.get(path.name.lower()) for path in folders}
    found = [path.name for path, split in named.items() if split]
    if not found:
        return {}
    others = [path.name for path, split in named.items() if not split]
    counts = Counter(split for split in named.values() if split)
    if others:
        problem = f"split folders {found} beside other folders {others}"
    elif max(counts.values()) > 1:
        problem = f"several folders for one split: {found}"
    elif not {"train", "test"} <= set(counts):
        problem = f"split folders {found} without both train and test"
    else:
        return {split: path for path, split in named.items() if split}
    raise ValueError(
        f"task {name!r}: {root} has an ambiguous layout, {problem}; lay it out as "
        "<split>/<class>/* with train and test (val optional) or as <class>/*"
    )


def _check_splits(name: str, origin: str, splits: Mapping[str, Sequence[object]]) -> None:
    empty = [split for split in SPLITS if not splits[split]]
    if empty:
        raise ValueError(f"task {name!r}: {origin} has no readable images in split(s) {empty}")


def _class_images(folder: Path, failures: list[dict[str, str]]) -> list[tuple[Path, str]]:
    images = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and _decodes(path, failures):
                images.append((path, class_dir.name))
    return images


def _decodes(path: Path, failures: list[dict[str, str]]) -> bool:
    """Whether `path` decodes in full; if not, it is recorded in `failures`."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        failures.append({"file": str(path), "reason": f"unreadable image: {exc}"})
        return False
    return True


def write_splits_csv(task: LabelledTask, layout: DataLayout) -> Path:
    """`<eval dir>/<task>/splits.csv`: every image the task used (`image`: its path, relative to
    the data folder when inside it) and its `split`, so anyone can check disjointness."""
    path = layout.ssl_eval_dir / task.name / SPLITS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "split"])
        for split in SPLITS:
            for image, _ in task.splits[split]:
                writer.writerow([layout.stored(image), split])
    return path
