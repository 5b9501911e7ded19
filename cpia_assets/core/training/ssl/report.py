"""What a pre-training run reports besides its numbers: curves as PNGs, drawn with Pillow (no
plotting library needed), and a warning when its encoder has hardly left its initialisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from cpia_assets.core.fsutil import atomic_path

MOSTLY_INITIAL = 0.1
"""Above this share of its initial weights in the exported encoder, a run is flagged."""


def plot_curve(
    steps: Sequence[int],
    values: Sequence[float],
    path: Path,
    *,
    title: str,
    size: tuple[int, int] = (640, 360),
) -> Path:
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="grey")
    if values:
        low, high = min(values), max(values)
        span_y, span_x = (high - low) or 1.0, (max(steps) - min(steps)) or 1
        points = [
            (left + (s - min(steps)) / span_x * (width - left - right),
             height - bottom - (v - low) / span_y * (height - top - bottom))
            for s, v in zip(steps, values, strict=True)
        ]  # fmt: skip
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        draw.text((4, top), f"{high:.3f}", fill="black")
        draw.text((4, height - bottom - 10), f"{low:.3f}", fill="black")
        draw.text((left, height - bottom + 6), f"step {min(steps)}", fill="black")
        draw.text((width - right - 80, height - bottom + 6), f"step {max(steps)}", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def initial_share_warning(summary: Mapping[str, Any]) -> str | None:
    """A warning when the run's exported encoder (`exported_initial_share` of its summary) is
    still mostly its initial weights (random, or the `init` file): a momentum teacher averaged
    over a run much shorter than its EMA time constant. None otherwise."""
    share = summary["exported_initial_share"]
    if share <= MOSTLY_INITIAL:
        return None
    return (
        f"the exported {summary['method']} encoder is still {share:.0%} its initial weights "
        f"after {summary['steps']} steps (its teacher is a momentum average): "
        "an evaluation of it measures little of the training; train longer or lower the momentum"
    )
