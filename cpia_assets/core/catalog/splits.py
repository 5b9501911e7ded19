"""Declared seeded stratified splits for labelled sets that ship no official split.

The paper splits pRCC and CAM16 7:1:2 per class; the catalog declares the same for any labelled
ROI set without an official split: `splits: {from: stratified, ratios: {train: 7, val: 1,
test: 2}, seed: 0}`. Within each label the images are ordered by a seeded hash of their path
(so the order, and the split, depends only on the seed and the set of paths, not on listing
order or on the other images) and cut into train, val and test runs sized by the ratios,
rounded to whole images by largest remainder (ties go to train, then test, then val).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping

STRATIFIED = "stratified"
"""The `from` of a catalog split rule that declares this split."""
DEFAULT_RATIOS: Mapping[str, int] = {"train": 7, "val": 1, "test": 2}
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
