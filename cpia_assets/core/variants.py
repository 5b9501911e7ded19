"""Data variants of the paper's Table II "data" column: what an export or a pre-training reads.

`cpia-mini` is CPIA-Mini; `cpia` is the full CPIA; `cpia-l`, `cpia-m` and `cpia-s` are the full
CPIA restricted to one top folder (L, M or S).
"""

from __future__ import annotations

DATA_VARIANTS: tuple[str, ...] = ("cpia-mini", "cpia", "cpia-l", "cpia-m", "cpia-s")

VARIANT_FOLDERS: dict[str, tuple[str, ...]] = {
    "cpia-mini": ("L", "M", "S"),
    "cpia": ("L", "M", "S"),
    "cpia-l": ("L",),
    "cpia-m": ("M",),
    "cpia-s": ("S",),
}
