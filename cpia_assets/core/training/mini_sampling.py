"""CPIA-Mini's sampling, from the catalog and the tile records alone: its settings, each WSI
sub-dataset's XL quota, and the seeded picks of XL tiles and S cells (`mini` module docstring)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cpia_assets.core.catalog.model import Catalog, SubDataset
from cpia_assets.core.training.exclusions import Exclusions, ExclusionSettings


@dataclass(frozen=True)
class MiniSettings:
    organ_xl_budget: int = 1600
    """XL tiles per Table I organ row, divided among its WSI sub-datasets."""
    subdataset_xl_cap: int = 800
    """At most this many XL tiles from one sub-dataset."""
    m_per_xl: int = 32
    s_min_tissue: float = 0.10
    """Tissue fraction a 96 px cell needs to be the S crop of its M tile."""
    seed: int = 0
    jpeg_quality: int = 90
    exclusions: ExclusionSettings = field(default_factory=ExclusionSettings)

    def __post_init__(self) -> None:
        for name in ("organ_xl_budget", "subdataset_xl_cap", "m_per_xl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.s_min_tissue <= 1:
            raise ValueError(f"s_min_tissue must be in [0, 1], got {self.s_min_tissue}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1-100, got {self.jpeg_quality}")


def xl_quota(catalog: Catalog, key: str, settings: MiniSettings, exclusions: Exclusions) -> int:
    """XL tiles the WSI sub-dataset `key` may give to Mini: its Table I organ row's budget
    water-filled over the row's WSI sub-datasets (those not wholly excluded), each taking at most
    its published XL count (unbounded when unknown) and `subdataset_xl_cap`. Each gets the same
    share, the largest whole one the budget allows, unless it has fewer XL tiles: what one cannot
    use passes to its peers. From the catalog alone, so partitions stay independent."""
    entry = catalog.get(key)
    if entry.kind != "wsi" or exclusions.whole(key):
        return 0
    cap = settings.subdataset_xl_cap

    def limit(peer: SubDataset) -> int:
        return min(cap, peer.published_counts.get("XL", cap))

    limits = sorted(
        limit(e)
        for e in catalog.subdatasets
        if e.kind == "wsi"
        and e.table_i_organ == entry.table_i_organ
        and not exclusions.whole(e.key)
    )
    budget, share = settings.organ_xl_budget, cap
    for filled, peer_limit in enumerate(limits):  # the smallest first: the rest share the left
        share = budget // (len(limits) - filled)
        if peer_limit > share:
            break
        budget -= peer_limit
    return min(limit(entry), share)


def rng(*parts: object) -> np.random.Generator:
    """A generator seeded from `parts`, the same on every machine and run."""
    seed = hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8]
    return np.random.default_rng(int.from_bytes(seed, "big"))


def _shuffled(items: Sequence[str], *seed: object) -> list[str]:
    ordered = sorted(items)
    return [ordered[i] for i in rng(*seed).permutation(len(ordered))]


def spread_over_slides(
    xl_by_slide: Mapping[str, Sequence[str]], quota: int, seed: int
) -> list[str]:
    """Up to `quota` XL tile names, taken round-robin over the slides (seeded orders)."""
    queues = [_shuffled(xl_by_slide[slide], seed, slide) for slide in _shuffled(xl_by_slide, seed)]
    chosen: list[str] = []
    for depth in range(max(map(len, queues), default=0)):
        for queue in queues:
            if len(chosen) == quota:
                return chosen
            if depth < len(queue):
                chosen.append(queue[depth])
    return chosen


def choose_s_cell(
    tissue: np.ndarray, min_tissue: float, *seed: object, preferred: np.ndarray | None = None
) -> tuple[int, int]:
    """(column, row) of the S cell to crop from an M tile, given the cells' tissue fractions:
    a seeded pick among the `preferred` cells (full-CPIA S tiles) that reach `min_tissue`,
    else among all cells that do, else the richest cell."""
    flat = tissue.ravel()
    eligible = np.flatnonzero(flat >= min_tissue)
    if preferred is not None:
        eligible_preferred = eligible[preferred.ravel()[eligible]]
        if eligible_preferred.size:
            eligible = eligible_preferred
    if not eligible.size:
        eligible = np.array([int(flat.argmax())])
    row, column = divmod(int(rng(*seed).choice(eligible)), tissue.shape[1])
    return column, row
