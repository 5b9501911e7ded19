"""Thin Dagster shell: assets, resources, partitions and schedules around `cpia_assets.core`."""
