"""A loss curve as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from cpia_assets.core.fsutil import atomic_path


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
