"""CPIA platform: builds the CPIA multi-scale pathology pre-training dataset as Dagster assets.

`cpia_assets.core` holds the functional core (no Dagster import); `cpia_assets.defs` is the thin
Dagster shell that wires catalog, configuration and resources around it.
"""
