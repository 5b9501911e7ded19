"""Data variants: the training sets of the paper's Table II ("data" column).

Shared by the export asset (one shard set per variant) and SSL training (one dimension of its
checkpoint partitions). Folders are CPIA's top folders: L (WSI XL and L, ROI L), M and S.
"""

from __future__ import annotations

DATA_VARIANTS: tuple[str, ...] = ("cpia-mini", "cpia", "cpia-l", "cpia-m", "cpia-s")
"""CPIA-Mini; full CPIA; full CPIA restricted to the top folder L, M or S."""

VARIANT_FOLDERS: dict[str, tuple[str, ...]] = {
    "cpia-mini": ("L", "M", "S"),
    "cpia": ("L", "M", "S"),
    "cpia-l": ("L",),
    "cpia-m": ("M",),
    "cpia-s": ("S",),
}
"""The top folders each variant reads."""
