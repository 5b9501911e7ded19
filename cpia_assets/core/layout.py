"""Where every output lives under the data folder (the platform's output contract)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SCALE_FOLDERS = ("L", "M", "S")
"""Top folders of CPIA: WSI XL and L tiles and ROI L images go under L."""

SCALE_FOLDER_OF = {"XL": "L", "L": "L", "M": "M", "S": "S"}


def default_data_dir() -> Path:
    """`CPIA_DATA_DIR`, or ./data, resolved at call time (never at import time)."""
    return Path(os.environ.get("CPIA_DATA_DIR", "data")).resolve()


@dataclass(frozen=True)
class DataLayout:
    """Paths of every stage's outputs below one data folder."""

    root: Path

    def raw_dir(self, key: str) -> Path:
        return self.root / "raw" / key

    def unpacked_dir(self, key: str) -> Path:
        """Images unpacked from the source's container files (HDF5 patch arrays)."""
        return self.root / "unpacked" / key

    def standardized_dir(self, key: str) -> Path:
        return self.root / "standardized" / key

    @property
    def cpia_dir(self) -> Path:
        return self.root / "cpia"

    def image_dir(self, scale: str, key: str) -> Path:
        """Folder of one sub-dataset's images of one scale (XL lands under L)."""
        return self.cpia_dir / SCALE_FOLDER_OF[scale] / key

    @property
    def mini_dir(self) -> Path:
        return self.root / "cpia-mini"

    def mini_image_dir(self, folder: str, key: str) -> Path:
        """Folder of one sub-dataset's CPIA-Mini images under a top folder L, M or S."""
        return self.mini_dir / folder / key

    def shards_dir(self, variant: str) -> Path:
        """WebDataset shards and index of one data variant (core/training/variants.py)."""
        return self.root / "shards" / variant

    @property
    def ssl_checkpoints_dir(self) -> Path:
        return self.root / "ssl" / "checkpoints"

    def ssl_checkpoint_dir(self, method: str, variant: str, init: str = "random") -> Path:
        """One pre-training's encoder, Lightning checkpoints, resolved config and metrics; runs
        started from ImageNet weights (`init="ImageNet"`) keep their own folder."""
        suffix = "" if init == "random" else f"__{init.lower()}"
        return self.ssl_checkpoints_dir / f"{method}__{variant}{suffix}"

    @property
    def ssl_eval_dir(self) -> Path:
        """Downstream results, one JSON per task and evaluated encoder."""
        return self.root / "ssl" / "eval"

    @property
    def catalog_cache_dir(self) -> Path:
        """Validated catalogs kept for the next process (`catalog/cache.py`); safe to delete."""
        return self.root / "cache" / "catalogs"

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    def manifest_dir(self, key: str) -> Path:
        """Per-partition Parquet records; partitioned assets never open the DuckDB file."""
        return self.manifests_dir / key

    def manifest_file(self, key: str, table: str) -> Path:
        return self.manifest_dir(key) / f"{table}.parquet"

    @property
    def duckdb_path(self) -> Path:
        return self.root / "manifest.duckdb"

    def relative(self, path: Path) -> str:
        """A path as stored in manifests: relative to the data folder, POSIX separators."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def stored(self, path: Path) -> str:
        """A path as records store it: relative to the data folder when it lies inside it (also
        through a symlinked folder, e.g. raw/<key> linked to a user's folder), else absolute."""
        try:
            return self.relative(path)
        except ValueError:
            pass
        absolute = Path(path).absolute()
        try:
            return absolute.relative_to(self.root.absolute()).as_posix()
        except ValueError:
            return absolute.as_posix()
