"""The samples of an export, kept on disk and streamed (`Selection`), and the record files
read in batches (`record_batches`): what keeps `training_shards`' memory flat however many
samples (see shards.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

T = TypeVar("T")


def sample_key(subdataset: str, scale: str, image_name: str) -> str:
    """`<subdataset>__<scale>__<image_name>` without dots, one key per name: "%" and "." of the
    name are percent-encoded (`cell.1` -> `cell%2E1`); keys and scales hold neither, nor "_"."""
    encoded = image_name.replace("%", "%25").replace(".", "%2E")
    return f"{subdataset}__{scale}__{encoded}"


def record_batches(
    path: Path, columns: Sequence[str], batch_rows: int
) -> Iterator[list[dict[str, Any]]]:
    """The rows of a Parquet record file, `batch_rows` at a time (at most), in file order;
    `columns` it lacks are None."""
    parquet = pq.ParquetFile(path)
    present = [name for name in columns if name in parquet.schema_arrow.names]
    absent = dict.fromkeys(name for name in columns if name not in present)
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
        rows = batch.to_pylist()
        if absent:
            rows = [row | absent for row in rows]
        yield rows


class Selection:
    """The samples of an export, on disk: a DuckDB file in a hidden folder beside the shards
    (`.selection-<host>-<pid>-*`, deleted when this object is closed or collected, or by the
    next export's `_recover` when its process is gone), fed and read `batch_rows` at a time,
    so an export's memory does not grow with its samples: DuckDB holds at most
    `SELECTION_MEMORY` and spills its sorts to disk.

    Each sample is its key, partition, sub-dataset, scale, image name, path, perceptual hash,
    `redistributable` and its sidecar as the JSON text written to the shard. Images `hold`
    out of a partition leave it whatever batch they came in (`held_out`: images per reason,
    one per identity as in `exclusions.held_out`)."""

    def __init__(self, folder: Path, *, batch_rows: int | None = None) -> None:
        self.batch_rows = batch_rows or BATCH_ROWS
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=_selection_prefix(os.getpid()), dir=folder))
        self._con = duckdb.connect(
            str(self.folder / "selection.duckdb"),
            config={"memory_limit": SELECTION_MEMORY, "threads": SELECTION_THREADS,
                    "temp_directory": str(self.folder / "spill")},
        )  # fmt: skip
        self._con.execute(
            "CREATE TABLE samples (key VARCHAR, part VARCHAR, subdataset VARCHAR, "
            "scale VARCHAR, image_name VARCHAR, path VARCHAR, phash BIGINT, "
            "redistributable BOOLEAN, meta VARCHAR)"
        )
        self._con.execute(
            "CREATE TABLE held (seq BIGINT, part VARCHAR, scale VARCHAR, image_name VARCHAR, "
            "reason VARCHAR)"
        )
        self._held_rows = 0
        self._count: int | None = None
        self._finalizer = weakref.finalize(self, _close_selection, self._con, self.folder)

    def add(self, sidecars: Iterable[Mapping[str, Any]], *, partition: str | None = None) -> None:
        """Append samples (each sidecar as written to its shard), `batch_rows` at a time;
        `partition`: the catalog key whose held images they exclude (default: their
        sub-dataset)."""
        self._count = None
        for chunk in _chunks(sidecars, self.batch_rows):
            columns: dict[str, list[Any]] = {name: [] for name in _SAMPLE_COLUMNS}
            for meta in chunk:
                values = (
                    sample_key(meta["subdataset"], meta["scale"], meta["image_name"]),
                    partition or meta["subdataset"], meta["subdataset"], meta["scale"],
                    meta["image_name"], meta.get("path"), meta.get("phash"),
                    meta.get("redistributable"), json.dumps(dict(meta), sort_keys=True),
                )  # fmt: skip
                for name, value in zip(_SAMPLE_COLUMNS, values, strict=True):
                    columns[name].append(value)
            self._insert("samples", pa.table(columns, schema=_SAMPLE_SCHEMA))

    def hold(self, partition: str, reasons: Mapping[tuple[str, str], str]) -> None:
        """Leave the images of `partition` with these (scale, image name) identities out, each
        counted once under its reason (a later one replaces an earlier)."""
        if not reasons:
            return
        self._count = None
        first = self._held_rows
        self._held_rows += len(reasons)
        columns = {
            "seq": list(range(first, self._held_rows)),
            "part": [partition] * len(reasons),
            "scale": [scale for scale, _ in reasons],
            "image_name": [name for _, name in reasons],
            "reason": list(reasons.values()),
        }
        self._insert("held", pa.table(columns, schema=_HELD_SCHEMA))

    def held_out(self) -> Counter[str]:
        """Images held out per reason: one per (partition, scale, name), its last reason."""
        rows = self._con.execute(
            "SELECT reason, count(*) FROM (SELECT arg_max(reason, seq) AS reason FROM held "
            "GROUP BY part, scale, image_name) GROUP BY reason"
        ).fetchall()
        return Counter(dict(rows))

    def __len__(self) -> int:
        self._settle()
        assert self._count is not None
        return self._count

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The sidecars, in key order."""
        for batch in self.batches("key", ("meta",)):
            yield from (json.loads(meta) for (meta,) in batch)

    def batches(self, order: str, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        """The samples' `columns` (identifiers of this class), `batch_rows` rows at a time,
        ordered by the SQL expression `order` (this module's, never a user's)."""
        self._settle()
        reader = self._con.sql(
            f"SELECT {', '.join(columns)} FROM samples ORDER BY {order}"
        ).to_arrow_reader(self.batch_rows)
        for batch in reader:
            yield list(zip(*(column.to_pylist() for column in batch.columns), strict=True))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of a query on the `samples` table (this module's SQL)."""
        self._settle()
        return self._con.execute(sql, list(params)).fetchall()

    def copy_to_parquet(self, sql: str, path: Path) -> None:
        self._settle()
        self._con.execute(f"COPY ({sql}) TO '{path}' (FORMAT parquet)")

    def close(self) -> None:
        self._finalizer()

    def _insert(self, table: str, rows: pa.Table) -> None:
        self._con.register("_rows", rows)
        try:
            self._con.execute(f"INSERT INTO {table} SELECT * FROM _rows")
        finally:
            self._con.unregister("_rows")

    def _settle(self) -> None:
        """Drop the samples of held identities (those held in a later batch than theirs)."""
        if self._count is not None:
            return
        if self._held_rows:
            self._con.execute(
                "DELETE FROM samples USING held WHERE samples.part = held.part "
                "AND samples.scale = held.scale AND samples.image_name = held.image_name"
            )
        [(self._count,)] = self._con.execute("SELECT count(*) FROM samples").fetchall()


BATCH_ROWS = 50_000
"""Rows read, kept in memory and written at a time by the selection and the export."""
SELECTION_MEMORY = "1GB"
SELECTION_THREADS = 2
"""DuckDB's limits for a selection: sorts beyond the memory limit spill to disk."""
_SELECTION_PREFIX = ".selection-"
_SAMPLE_COLUMNS = ("key", "part", "subdataset", "scale", "image_name", "path", "phash",
                   "redistributable", "meta")  # fmt: skip
_SAMPLE_SCHEMA = pa.schema(
    [(name, pa.string()) for name in _SAMPLE_COLUMNS[:6]]
    + [("phash", pa.int64()), ("redistributable", pa.bool_()), ("meta", pa.string())]
)
_HELD_SCHEMA = pa.schema([("seq", pa.int64())] + [(name, pa.string()) for name in
                          ("part", "scale", "image_name", "reason")])  # fmt: skip


def _selection_prefix(pid: int) -> str:
    return f"{_SELECTION_PREFIX}{socket.gethostname()}-{pid}-"


def remove_dead_selections(folder: Path) -> None:
    """Delete the selections that killed exports of this host left in `folder`."""
    for stale in folder.glob(f"{_selection_prefix(0)[:-2]}*"):
        pid = stale.name.removeprefix(_selection_prefix(0)[:-2]).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _close_selection(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    con.close()
    shutil.rmtree(folder, ignore_errors=True)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
