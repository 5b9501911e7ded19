"""One static partition per sub-dataset of the active catalog."""

from __future__ import annotations

import dagster as dg

from cpia_assets.core.catalog.model import Catalog


def subdataset_partitions(catalog: Catalog) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(catalog.keys)
