"""The automation rebuilds every built partition of an asset whose code version changed, and
only that asset's partitions (on the real platform of `test_versions`)."""

from __future__ import annotations

import dagster as dg

from cpia_assets_tests.defs import test_versions
from cpia_assets_tests.defs.test_versions import Platform

platform = test_versions.platform  # the same fixture: two local ROI partitions


def _with_code_version(defs: dg.Definitions, asset: str, version: str) -> dg.Definitions:
    """`defs` as after a release that bumped `asset`'s code version."""
    return defs.permissive_map_resolved_asset_specs(
        func=lambda spec: spec.replace_attributes(code_version=version),
        selection=dg.AssetSelection.assets(asset),
    )


def test_a_new_code_version_rebuilds_the_assets_partitions(platform: Platform) -> None:
    platform.observe()
    for key in ("cells-a", "cells-b"):
        platform.build(key)
    platform.automation_tick()  # the sensor's first tick
    assert platform.automation_tick() == {}
    platform.defs = _with_code_version(platform.defs, "cpia_mini", "new-release")
    assert platform.to_rebuild() == ["cells-a", "cells-b"]
    assert platform.automation_tick() == {"cpia_mini": {"cells-a", "cells-b"}}
    assert platform.automation_tick() == {}  # requested once
    platform.build("cells-a")
    assert platform.to_rebuild() == ["cells-b"]  # rebuilt under the new version: fresh
