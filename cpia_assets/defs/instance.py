"""Dagster instance settings the platform relies on (pools), written into DAGSTER_HOME."""

from __future__ import annotations

from pathlib import Path

INSTANCE_YAML = """\
# Written by cpia_assets (defs/instance.py). Pools bound concurrency across runs:
#   duckdb    = 1  (tile_manifest is the only DuckDB writer)
#   downloads = 4  (raw_download runs at once)
concurrency:
  pools:
    granularity: op
    default_limit: 1
"""


def write_instance_config(home: Path) -> Path:
    """Create DAGSTER_HOME with the platform's dagster.yaml unless the user already has one."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_YAML)
    return config
