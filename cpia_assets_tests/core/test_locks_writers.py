"""What two builds of one partition at once used to do to each other, now an error: a slide
whose temporary TIFF vanishes while libvips writes it fails the stage (an internal error), and is
no longer recorded as a bad slide while the step succeeds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.fsutil import OutputLostError
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.wsi import standardize
from cpia_assets.core.wsi.settings import StandardizeSettings
from cpia_assets.core.wsi.slide_jobs import standardize_partition
from cpia_assets_tests.support.slide_factory import build_40x_slide

KEY = "p"


def test_a_temporary_removed_under_libvips_fails_the_stage(tmp_path: Path, monkeypatch) -> None:
    raw = tmp_path / "data" / "raw" / KEY
    raw.mkdir(parents=True)
    slides = [build_40x_slide(raw / f"{name}.tiff", 1200) for name in ("a", "b")]
    original = standardize._write_standardized

    def removed_by_another_build(reader, plan, dest: Path, settings, strips) -> None:
        if dest.name == "b.tiff":
            shutil.rmtree(dest.parent)  # another build's `_remove_stale_temporaries`
        original(reader, plan, dest, settings, strips)

    monkeypatch.setattr(standardize, "_write_standardized", removed_by_another_build)
    layout = DataLayout(tmp_path / "data")
    with pytest.raises(OutputLostError) as raised:
        standardize_partition(slides, key=KEY, layout=layout, options=WsiOptions(),
                              settings=StandardizeSettings())  # fmt: skip
    message = str(raised.value)
    assert message.startswith(
        f"internal error while writing {layout.standardized_dir(KEY) / 'b.tiff'}: the temporary "
    )
    assert "vanished while it was written (removed by another process?)" in message
