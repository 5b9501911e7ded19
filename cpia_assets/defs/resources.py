"""Resources: where the data lives, which catalog is active, and where per-item work runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.catalog.model import Catalog, SubDataset
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.parallel import local_pool


class CpiaStore(dg.ConfigurableResource):
    """The data folder and the active sub-dataset catalog."""

    data_dir: str
    catalog_path: str

    _catalog: Catalog | None = PrivateAttr(default=None)

    @property
    def layout(self) -> DataLayout:
        return DataLayout(Path(self.data_dir).resolve())

    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog(self.catalog_path, cache_dir=self.layout.catalog_cache_dir)
        return self._catalog

    def entry(self, key: str) -> SubDataset:
        return self.catalog().get(key)


class WorkerPool(dg.ConfigurableResource):
    """Where per-slide and per-image work runs inside one partition's step.

    `workers=0` uses every local core; `workers=1` runs in-process. `dask_scheduler` (e.g.
    `tcp://scheduler:8786`) sends the work to a Dask cluster instead, for scale-out beyond one host.
    The local process pool is started once per run (at its first use) and serves every step of
    the run (the partition runs execute in one process, `definitions.py`); a pool that a dead
    worker broke is replaced at its next use.
    """

    workers: int = 0
    dask_scheduler: str | None = None

    _pool: ProcessPoolExecutor | None = PrivateAttr(default=None)

    @contextmanager
    def executor(self) -> Iterator[Executor | None]:
        if self.dask_scheduler:
            from distributed import Client

            with Client(self.dask_scheduler) as client:
                yield client.get_executor()
            return
        workers = self.workers or os.cpu_count() or 1
        if workers == 1:
            yield None
            return
        if self._pool is None or getattr(self._pool, "_broken", False):
            self._shutdown()
            self._pool = local_pool(workers)
        yield self._pool

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
