"""Declared seeded stratified splits for labelled sets that ship no official split.

The paper splits pRCC and CAM16 7:1:2 per class; the catalog declares the same for any labelled
ROI set without an official split: `splits: {from: stratified, ratios: {train: 7, val: 1,
test: 2}, seed: 0}`. Within each label the images are ordered by a seeded hash of their path
(so the order, and the split, depends only on the seed and the set of paths, not on listing
order or on the other images) and cut into train, val and test runs sized by the ratios,
rounded to whole images by largest remainder (ties go to train, then test, then val).

A labelled set whose split gives train and test but no validation part (Raabin-WBC: Train and
Test-A) gets one carved from train with the same function (`carve_validation`), recorded in its
records' split, so that Mini, every export and the evaluation hold out the same images.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping

STRATIFIED = "stratified"
"""The `from` of a catalog split rule that declares this split."""
DEFAULT_RATIOS: Mapping[str, int] = {"train": 7, "val": 1, "test": 2}
CARVED_VALIDATION: Mapping[str, int] = {"train": 10, "val": 2}
"""train:val of a carved validation part: the paper's WBC split, 10:2:5 with the official test."""
_FILL_ORDER = ("train", "test", "val")
"""Tie order for leftover images: training data first, then the test set."""


def stratified_split(
    labelled: Iterable[tuple[str, str | None]],
    *,
    ratios: Mapping[str, int] = DEFAULT_RATIOS,
    seed: int = 0,
) -> dict[str, str]:
    """The split of each (path, label) pair; images without a label form their own stratum."""
    if set(ratios) - set(_FILL_ORDER) or not ratios or min(ratios.values()) < 0:
        raise ValueError(
            f"stratified split ratios must be non-negative train/val/test, got {ratios}"
        )
    total = sum(ratios.values())
    if total == 0:
        raise ValueError("stratified split ratios must not all be zero")
    strata: dict[str | None, list[str]] = defaultdict(list)
    for path, label in labelled:
        strata[label].append(path)
    assigned: dict[str, str] = {}
    for paths in strata.values():
        ordered = sorted(paths, key=lambda path: _seeded_key(path, seed))
        for split, members in _cut(ordered, ratios, total).items():
            assigned.update(dict.fromkeys(members, split))
    return assigned


def _seeded_key(path: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{path}".encode("utf-8", "surrogateescape")).digest()


def _cut(ordered: list[str], ratios: Mapping[str, int], total: int) -> dict[str, list[str]]:
    """Consecutive runs of `ordered` sized by the ratios (largest remainders get the leftovers)."""
    count = len(ordered)
    exact = {split: count * ratios.get(split, 0) / total for split in _FILL_ORDER}
    sizes = {split: int(value) for split, value in exact.items()}
    leftovers = sorted(
        _FILL_ORDER, key=lambda split: (-(exact[split] - sizes[split]), _FILL_ORDER.index(split))
    )
    for split in leftovers[: count - sum(sizes.values())]:
        sizes[split] += 1
    runs, start = {}, 0
    for split in ("train", "val", "test"):
        runs[split] = ordered[start : start + sizes[split]]
        start += sizes[split]
    return runs


def carve_validation(
    annotated: Iterable[tuple[str, str | None, str]], *, seed: int = 0
) -> dict[str, str]:
    """The split of each (path, label, split): as given, except that when train and test are
    given and val is not, a stratified `CARVED_VALIDATION` part of train becomes val."""
    annotated = list(annotated)
    given = {split for _, _, split in annotated}
    splits = {path: split for path, _, split in annotated}
    if {"train", "test"} <= given and "val" not in given:
        train = [(path, label) for path, label, split in annotated if split == "train"]
        splits |= stratified_split(train, ratios=CARVED_VALIDATION, seed=seed)
    return splits
