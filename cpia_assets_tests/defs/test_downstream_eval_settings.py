"""downstream_eval refuses settings it cannot run before it writes anything: a task name is a
folder name under ssl/eval/, so one that climbs out (`../../../x`) or is absolute fails the run."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.layout import DataLayout
from cpia_assets.definitions import build_definitions
from cpia_assets_tests.support.ssl_data import labelled_task


@pytest.mark.parametrize("name", ["../../../x", "{tmp_path}/outside"])
def test_a_task_name_outside_the_eval_folder_fails_the_run_naming_it(
    tmp_path: Path, name: str
) -> None:
    name = name.format(tmp_path=tmp_path)  # absolute: inside the test's folder all the same
    data = tmp_path / "a" / "b" / "data"
    cells = labelled_task(tmp_path / "cells", {"train": 2, "val": 1, "test": 1})
    defs = build_definitions(load_catalog("demo"), data)
    config = {"tasks": {name: str(cells)}, "epochs": 1, "image_size": 32, "workers": 0,
              "baseline_model": "vit_tiny_patch16_224"}  # fmt: skip
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        asset_selection=[dg.AssetKey("downstream_eval")],
        run_config={"ops": {"downstream_eval": {"config": config}}},
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert f"task name {name!r} must be letters" in failure.step_failure_data.error.message
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(cells)]
    assert not (DataLayout(data).ssl_eval_dir / name).exists()
    assert [p for p in written if not p.is_relative_to(data)] == []
