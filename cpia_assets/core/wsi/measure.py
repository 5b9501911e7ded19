"""How fast this machine tiles: the real one-pass standardize-and-tile core (`fused`) run on
synthetic slides made of the shipped CC0 H&E crop (`synthetic.he_sample`), for
`cpia plan --measure`.

The slides are tissue everywhere (the crop mirror-tiled) and declared 40x (0.25 um/px, JPEG
q75 like a scanner's), so every XL cell is kept and each slide is shrunk 2x to the standard
0.491 um/px and written as the standardized pyramidal TIFF (q89 default), with every L, M and
a 10% sample of S tiles.
Throughput is kept XL tiles per second over `workers` processes, one slide each, started before
the clock (their start-up is not counted). For real slides it is an upper bound: glass between
tissue costs decoding, resampling and TIFF encoding but gives no tiles.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.parallel import local_pool
from cpia_assets.core.synthetic import HE_SAMPLE_MPP, he_sample, mirror_tile, write_slide
from cpia_assets.core.wsi.fused import standardize_and_tile_partition
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.tiling import TilingSettings

SOURCE_MPP = 0.25
"""The measured slides are declared 40x: each is shrunk 2x to the standard resolution."""
SOURCE_QUALITY = 75
"""JPEG quality of the synthetic source slides (about a scanner's)."""
_KEY = "measure"


@dataclass(frozen=True)
class Measurement:
    """One measurement: `xl_tiles` kept XL tiles (with their L, M and S tiles and the TIFF) of
    `slides` slides of `source_megapixels` in all, cut in `seconds` by `workers` processes."""

    seconds: float
    xl_tiles: int
    slides: int
    workers: int
    source_megapixels: float

    @property
    def xl_per_second(self) -> float:
        return self.xl_tiles / self.seconds if self.seconds > 0 else math.inf

    def describe(self) -> str:
        return (f"measured here: {self.xl_tiles} XL tiles of {self.slides} synthetic 40x slides "
                f"({self.source_megapixels:,.0f} source Mpx) in {self.seconds:.1f} s on "
                f"{self.workers} workers")  # fmt: skip


def measure_tiling(
    *, xl_per_edge: int = 2, workers: int | None = None, work_dir: Path | None = None
) -> Measurement:
    """Tile `workers` synthetic slides of `xl_per_edge`**2 XL tiles each (one per worker
    process; default: all cores) with the real tiling core and time it."""
    workers = max(1, workers or os.cpu_count() or 1)
    own_dir = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="cpia-measure-")) if own_dir else work_dir
    try:
        return _measure(root, xl_per_edge, workers)
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _measure(root: Path, xl_per_edge: int, workers: int) -> Measurement:
    settings, tiling = StandardizeSettings(), TilingSettings()
    edge = math.ceil(xl_per_edge * tiling.xl_size * settings.target_mpp / SOURCE_MPP) + 64
    raw = root / "raw" / _KEY
    raw.mkdir(parents=True, exist_ok=True)
    first = raw / "M-0000.tiff"
    sample = he_sample().resize(HE_SAMPLE_MPP / SOURCE_MPP, kernel="lanczos3")
    write_slide(first, mirror_tile(sample, edge, edge), SOURCE_MPP, quality=SOURCE_QUALITY)
    slides = [first]
    for index in range(1, workers):  # the same pixels under other names
        slides.append(raw / f"M-{index:04d}.tiff")
        shutil.copyfile(first, slides[-1])
    layout = DataLayout(root / "data")
    with local_pool(workers) as pool:
        list(pool.map(_warm, range(workers)))  # processes started and modules imported
        start = time.perf_counter()
        slide_result, tile_result = standardize_and_tile_partition(
            slides, key=_KEY, layout=layout, options=WsiOptions(), settings=settings,
            tiling=tiling, executor=pool,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    if slide_result.failures or tile_result.failures:
        problems = slide_result.failures + tile_result.failures
        raise RuntimeError(f"the measurement's tiling failed: {problems[0]['reason']}")
    xl = sum(1 for record in tile_result.records if record["scale"] == "XL")
    return Measurement(seconds, xl, len(slides), workers, len(slides) * edge * edge / 1e6)


def _warm(_: int) -> None:
    """Worker: import the tiling core before the clock starts."""
    import cpia_assets.core.wsi.fused  # noqa: F401
