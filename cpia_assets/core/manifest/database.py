"""Connections to `manifest.duckdb`: read-only ones for queries, the one writer of a load.

Partitioned stages write `manifests/<key>/*.parquet` and never open `manifest.duckdb`; only
`load_manifest` writes it (the `tile_manifest` asset, alone in its Dagster pool). DuckDB's file
lock keeps every other process out while it writes: opens wait for it, naming the holder, and a
file that is not a manifest of this code version is refused at once.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest.tables import SCHEMA_VERSION


class ManifestError(RuntimeError):
    """The manifest database cannot be loaded or read; the message names the file and reason."""


class ManifestUnavailableError(ManifestError):
    """`manifest.duckdb` is missing, or locked by the writer for longer than we waited."""


def open_manifest(
    layout: DataLayout, *, wait_s: float = 60, on_wait: Callable[[str], None] | None = None
) -> duckdb.DuckDBPyConnection:
    """A read-only connection to `manifest.duckdb` (the caller closes it).

    While tile_manifest writes, DuckDB refuses every other process even a read-only open; this
    waits up to `wait_s` for the writer to finish, telling `on_wait` which process holds it.
    A database tile_manifest did not write (no tables, or those of another code version) is
    refused at once.
    """
    path = layout.duckdb_path
    if not path.is_file():
        raise ManifestUnavailableError(
            f"{path} does not exist yet: materialize the tile_manifest asset first"
        )
    con = _connect(path, read_only=True, wait_s=wait_s, on_wait=on_wait)
    has_meta = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'manifest_meta'"
    ).fetchall() == [(1,)]
    versions = (
        con.execute("SELECT schema_version FROM manifest_meta").fetchall() if has_meta else []
    )
    if versions != [(SCHEMA_VERSION,)]:
        con.close()
        found = "the tables of another code version" if versions else "no manifest tables"
        raise ManifestUnavailableError(
            f"{path} holds {found}: materialize the tile_manifest asset to (re)build it"
        )
    return con


@contextmanager
def writer(
    path: Path, *, wait_s: float, on_wait: Callable[[str], None] | None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The read-write connection, waiting for short-lived readers (CLI, checks) to let go."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(path, read_only=False, wait_s=wait_s, on_wait=on_wait)
    try:
        yield con
    finally:
        con.close()


MEMORY_LIMIT_ENV = "CPIA_MANIFEST_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "4GB"
"""DuckDB's memory limit for the manifest (loads, checks, queries): beyond it, joins, sorts
and aggregations spill to `manifest.duckdb.tmp/`, so a load of the later release's 149 M
images stays within a few GB (DuckDB's own default is 80% of the machine's memory)."""


def memory_limit() -> str:
    """The memory limit: `$CPIA_MANIFEST_MEMORY_LIMIT` (e.g. "8GB") or DEFAULT_MEMORY_LIMIT."""
    return os.environ.get(MEMORY_LIMIT_ENV) or DEFAULT_MEMORY_LIMIT


DUCKDB_MAGIC = b"DUCK"
"""Bytes 8-11 of every DuckDB database file."""
_NOT_A_DATABASE = "it is not a valid DuckDB database file"
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")
_WAIT_NOTICE_S = 30
"""How often `on_wait` hears that the open still waits for the file lock."""


def _connect(
    path: Path, *, read_only: bool, wait_s: float, on_wait: Callable[[str], None] | None
) -> duckdb.DuckDBPyConnection:
    """Open the database, retrying while another process holds it (a file lock conflict) and
    telling `on_wait` (at once, then every `_WAIT_NOTICE_S`) which process that is.

    The Dagster pool keeps manifest steps apart; this also covers what it cannot: CLI readers,
    and two steps that claim the pool's one slot at the same instant on SQLite instance storage.
    A file that is not a DuckDB database is refused at once: no wait would make it one.
    """
    _require_duckdb_file(path)
    # Without insertion order, the multi-file INSERT of a load runs on all cores.
    config = {"memory_limit": memory_limit()}
    if not read_only:
        config["preserve_insertion_order"] = False
    mode = "reading" if read_only else "writing"
    deadline = time.monotonic() + wait_s
    next_notice = time.monotonic()
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as exc:
            if _NOT_A_DATABASE in str(exc):
                raise ManifestError(
                    f"{path} is not a DuckDB database file (empty or damaged): move it away; "
                    "the next tile_manifest run rebuilds it from the Parquet records"
                ) from exc
            holder = _lock_holder(exc)
            if time.monotonic() >= deadline:
                raise ManifestUnavailableError(
                    f"{path}: could not open for {mode} within {wait_s:.0f} s ({holder}): {exc}"
                ) from exc
            if on_wait is not None and time.monotonic() >= next_notice:
                on_wait(f"{path}: waiting up to {wait_s:.0f} s to open it for {mode}: {holder}")
                next_notice = time.monotonic() + _WAIT_NOTICE_S
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _require_duckdb_file(path: Path) -> None:
    """Raise ManifestError if `path` exists and does not start like a DuckDB database."""
    try:
        with path.open("rb") as handle:
            header = handle.read(len(DUCKDB_MAGIC) + 8)
    except FileNotFoundError:
        return  # the writer creates it
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from exc
    if header[8:] != DUCKDB_MAGIC:
        state = "not a DuckDB database file: " + ("an empty file" if not header else "wrong header")
        raise ManifestError(
            f"{path} is {state}: move it away; tile_manifest then rebuilds the manifest "
            "from the Parquet records"
        )


def _lock_holder(exc: duckdb.IOException) -> str:
    """Who holds the file lock, from DuckDB's message."""
    found = _LOCK_HOLDER.search(str(exc))
    if found is None:
        return "another process holds it"
    return f"process {found['pid']} ({found['program']}) holds it"
