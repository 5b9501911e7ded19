"""How a slide level becomes the target resolution: the plan (level, scale, output size)
and the filters.

Filters: area-style when shrinking, Lanczos-3 when enlarging.
- Shrinking on both axes (40x slides, the bulk of the pixels) runs in libvips as one lazy
  pipeline, decode -> resample -> `tiffsave` (`shrink_image`): an exact box filter (`shrink`)
  for the integer part of the factor and, for the fractional rest, `reduce` with the linear
  kernel, which libvips widens to the output pixel's footprint (an area-weighted, non-negative
  average, no ringing). libvips has no box filter for fractional factors; its `shrink` falls
  back to Lanczos-3 there. Pillow's fractional box costs about 2 s more per 16k x 16k slide.
- Any enlarging axis (most 20x slides) needs Lanczos-3, which libvips cannot enlarge with
  (`reduce` only shrinks; `resize` enlarges with bicubic), so those slides are resampled by
  Pillow in row bands (`resample_rows`: Lanczos-3 across an enlarging axis, box across a
  shrinking one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyvips
from PIL import Image

from cpia_assets.core.wsi.settings import StandardizeError, StandardizeSettings
from cpia_assets.core.wsi.slides import Mpp, SlideInfo


@dataclass(frozen=True)
class ResamplePlan:
    """Which level is read and how it maps onto the output (scales are output px per level px)."""

    level: int
    level_size: tuple[int, int]
    scale: tuple[float, float]
    output_size: tuple[int, int]
    output_mpp: tuple[float, float]

    @property
    def resampled(self) -> bool:
        return self.scale != (1.0, 1.0)

    @property
    def enlarges(self) -> bool:
        return max(self.scale) > 1.0


def plan_resample(info: SlideInfo, mpp: Mpp, settings: StandardizeSettings) -> ResamplePlan:
    """Choose the level and scale that bring the slide to `settings.target_mpp`.

    The level is the coarsest one whose MPP is still at or below the target on both axes, so
    detail is never invented by reading a level coarser than the output. The output size is
    floored so that every output pixel lies inside the slide.
    """
    target = settings.target_mpp
    width0, height0 = info.dimensions
    near_x = abs(mpp.x / target - 1) <= settings.tolerance
    near_y = abs(mpp.y / target - 1) <= settings.tolerance
    if settings.tolerance > 0 and near_x and near_y:
        return ResamplePlan(0, (width0, height0), (1.0, 1.0), (width0, height0), (mpp.x, mpp.y))
    level = 0
    for candidate, (width, height) in enumerate(info.level_dimensions):
        level_mpp_x = mpp.x * width0 / width
        level_mpp_y = mpp.y * height0 / height
        if level_mpp_x <= target * (1 + 1e-9) and level_mpp_y <= target * (1 + 1e-9):
            level = candidate
    width, height = info.level_dimensions[level]
    scale_x = mpp.x * width0 / width / target
    scale_y = mpp.y * height0 / height / target
    output = (
        max(1, math.floor(width * scale_x + 1e-6)),
        max(1, math.floor(height * scale_y + 1e-6)),
    )
    return ResamplePlan(level, (width, height), (scale_x, scale_y), output, (target, target))


def resample_rows(
    rows: Iterable[np.ndarray], plan: ResamplePlan, *, band_rows: int
) -> Iterator[np.ndarray]:
    """The resampled level, `band_rows` output rows at a time, from source rows given in order.

    Separable, per axis: box (area) filter where that axis shrinks, Lanczos-3 where it enlarges.
    Each source chunk is resampled horizontally once as it arrives; each output band is then
    resampled vertically from a window padded by the filter's support, with PIL's sub-pixel
    `box`, so the bands equal one whole-level horizontal-then-vertical resize (up to float
    rounding of filter windows that fall exactly on a pixel edge). Source rows are dropped as
    soon as no later band needs them.
    """
    if not plan.resampled:
        yield from rows
        return
    height, (scale_x, scale_y) = plan.level_size[1], plan.scale
    out_width, out_height = plan.output_size
    horizontal_filter, _ = _filter_for(scale_x)
    vertical_filter, support = _filter_for(scale_y)
    margin = math.ceil(support * max(1.0, 1.0 / scale_y)) + 2
    box_right = out_width / scale_x
    source = iter(rows)
    buffer = np.empty((0, out_width, 3), np.uint8)
    buffer_top = 0
    for out_top in range(0, out_height, band_rows):
        out_bottom = min(out_height, out_top + band_rows)
        top, bottom = out_top / scale_y, out_bottom / scale_y
        needed_top = max(0, math.floor(top) - margin)
        needed_bottom = min(height, math.ceil(bottom) + margin)
        chunks = [buffer[needed_top - buffer_top :]]
        available = buffer_top + len(buffer)
        while available < needed_bottom:
            chunk = next(source, None)
            if chunk is None:
                raise StandardizeError(f"source rows ended at {available} of {height}")
            box = (0, 0, box_right, len(chunk))
            resized = Image.fromarray(chunk).resize((out_width, len(chunk)), horizontal_filter, box)
            chunks.append(np.asarray(resized))
            available += len(chunk)
        buffer = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        buffer_top = needed_top
        window = Image.fromarray(buffer[: needed_bottom - buffer_top])
        box = (0, top - buffer_top, out_width, bottom - buffer_top)
        yield np.asarray(window.resize((out_width, out_bottom - out_top), vertical_filter, box))


def _filter_for(scale: float) -> tuple[Image.Resampling, float]:
    """PIL filter and its support (in output px) for one axis: area when shrinking."""
    if scale <= 1:
        return Image.Resampling.BOX, 0.5
    return Image.Resampling.LANCZOS, 3.0


def shrink_image(image: pyvips.Image, plan: ResamplePlan) -> pyvips.Image:
    """`image` (the plan's level) brought to the plan's output size by shrinking only: exact
    box averages over whole blocks of `floor(1 / scale)` pixels, then the linear kernel of
    `reduce` (widened to the footprint) for the fractional rest."""
    if plan.enlarges:
        raise ValueError(f"shrink_image cannot enlarge (scale {plan.scale})")
    return shrink_by(image, [1 / scale for scale in plan.scale]).crop(0, 0, *plan.output_size)


def shrink_by(image: pyvips.Image, factors: Sequence[float]) -> pyvips.Image:
    """`image` shrunk by (x, y) `factors` >= 1 with the area-style filter of `shrink_image`."""
    whole = [max(1, math.floor(factor + 1e-9)) for factor in factors]
    if max(whole) > 1:
        image = image.shrink(*whole)
    rest = [factor / block for factor, block in zip(factors, whole, strict=True)]
    if max(rest) > 1 + 1e-9:
        image = image.reduce(*rest, kernel="linear")
    return image
