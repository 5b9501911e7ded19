"""Mini's XL choice on real files follows its seed (the build, not only `spread_over_slides`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training.exclusions import Exclusions, ExclusionSettings
from cpia_assets.core.training.mini import build_mini_partition
from cpia_assets.core.training.mini_sampling import MiniSettings

KEY = "wsi-40x"


def _xl_tiles(layout: DataLayout, slides: int = 3, per_slide: int = 4) -> list[dict[str, Any]]:
    """XL tile records (no L or M children) with small stand-in images on disk."""
    rows = []
    for slide in range(slides):
        for x in range(per_slide):
            name = f"S{slide}-3840-{x}-0"
            path = layout.root / "cpia" / "L" / KEY / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (768, 768), (slide * 60, x * 40, 90)).save(path)
            rows.append({"image_name": name, "subdataset": KEY, "kind": "wsi", "scale": "XL",
                         "size_px": 3840, "x": x, "y": 0, "path": layout.relative(path),
                         "source_file": f"raw/{KEY}/S{slide}.svs", "label": None,
                         "split": "none", "parent_image": None, "phash": 0})  # fmt: skip
    return rows


def test_the_xl_choice_follows_the_seed(small_catalog_path: Path, tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    entry = load_catalog(small_catalog_path).get(KEY)
    tiles = _xl_tiles(layout)
    exclusions = Exclusions.load(ExclusionSettings(rules=()))

    def picked(seed: int) -> tuple[str, ...]:
        result = build_mini_partition(entry, tiles, quota=4, exclusions=exclusions,
                                      layout=layout, settings=MiniSettings(seed=seed))  # fmt: skip
        assert not result.failures
        return tuple(row["image_name"] for row in result.records if row["scale"] == "XL")

    choices = {seed: picked(seed) for seed in range(3)}
    assert picked(0) == choices[0]  # the same seed, the same tiles
    assert len(set(choices.values())) > 1
    for names in choices.values():
        assert sorted(Counter(name.split("-")[0] for name in names).values()) == [1, 1, 2]
    on_disk = sorted(path.stem for path in layout.mini_image_dir("L", KEY).glob("*.jpg"))
    assert on_disk == sorted(choices[0])  # the last build (seed 0) replaced the others
