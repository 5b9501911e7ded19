"""The CPIA manifest in DuckDB: per-partition Parquet records loaded incrementally, then queried.

Partitioned stages write `manifests/<key>/*.parquet` and never open `manifest.duckdb`; only
`load_manifest` writes it (the `tile_manifest` asset, alone in its Dagster pool). A load compares
each Parquet file's fingerprint (size, mtime, inode: an atomic rewrite always changes the inode)
with the one recorded when the file was last loaded, and replaces the rows of changed files only,
in one transaction: readers see the manifest before or after a load, never half of one.

Record tables (`tiles`, `rejected_tiles`, `roi_images`, `slides`, `raw_files`, `failures`,
`skipped`, `mini_images`, `mini_selection`) hold the Parquet columns (schema.py) plus
`subdataset` (the partition key, from the folder) and `manifest_file` (the Parquet file each
row came from). `subdatasets` and `organs` come from the catalog; `manifest_files` is the load
state; `tile_counts` keeps image counts per file and collection (`cpia`, `cpia-mini`) so
Table I never scans the tiles. Each load copies `mini_selection` (written by cpia_mini) onto
the `in_mini` and `mini_reason` columns of the tiles of the partitions it touched; rejected
candidates are `blank`. Views: `lineage` (a kept image, its parent tiles, standardized slide
and source file, with each stage's run id and code version; filter it by `subdataset` as
well as `image_name` and DuckDB reads one partition's row groups) and `table_i` (the paper's
Table I, each sub-dataset counted under its catalog `table_i_organ`).
User values reach SQL only as bound parameters; identifiers come from this module's constants.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from cpia_assets.core import schema
from cpia_assets.core.catalog import ALL_SCALES, TABLE_I_ORGANS, About, Catalog
from cpia_assets.core.fsutil import output_fault
from cpia_assets.core.layout import DataLayout

LOADER_STAGE = "tile_manifest"
"""The `failures.stage` of Parquet files the loader could not use (kept until they load)."""


class ManifestError(RuntimeError):
    """The manifest database cannot be loaded or read; the message names the file and reason."""


class ManifestUnavailableError(ManifestError):
    """`manifest.duckdb` is missing, or locked by the writer for longer than we waited."""


@dataclass(frozen=True)
class RecordTable:
    """A DuckDB table fed by one kind of per-partition Parquet file."""

    name: str
    pattern: str  # file name glob inside manifests/<key>/
    records: Mapping[str, pl.DataType]

    @property
    def columns(self) -> dict[str, pl.DataType]:
        """`subdataset` first, the record columns, run id and code version, the source file."""
        return {
            "subdataset": pl.String,
            **self.records,
            **schema.RUN_COLUMNS,
            "manifest_file": pl.String,
        }


RECORD_TABLES = (
    RecordTable("tiles", "tiles.parquet", schema.TILES),
    RecordTable("rejected_tiles", "rejected_tiles.parquet", schema.TILES),
    RecordTable("roi_images", "roi_images.parquet", schema.TILES),
    RecordTable("slides", "slides.parquet", schema.SLIDES),
    RecordTable("raw_files", "raw_files.parquet", schema.RAW_FILES),
    RecordTable("failures", "failures-*.parquet", schema.FAILURES),
    RecordTable("skipped", "skipped.parquet", schema.SKIPPED),
    RecordTable("mini_images", "mini_images.parquet", schema.MINI_IMAGES),
    RecordTable("mini_selection", "mini_selection.parquet", schema.MINI_SELECTION),
)
_RECORD_TABLE = {table.name: table for table in RECORD_TABLES}

TABLE_I_COLUMNS = (
    ("WSIs-XL", "wsi", "XL"),
    ("WSIs-L", "wsi", "L"),
    ("ROIs-L", "roi", "L"),
    ("WSIs-M", "wsi", "M"),
    ("ROIs-M", "roi", "M"),
    ("WSIs-S", "wsi", "S"),
    ("ROIs-S", "roi", "S"),
)
"""(column, kind, scale) of the paper's Table I, in its order."""

ABOUT_COLUMNS = {
    "licence": "VARCHAR",
    "redistributable": "BOOLEAN",  # NULL: unknown
    "stain": "VARCHAR",
    "diseases": "VARCHAR[]",
    "pathology": "VARCHAR",
    "year": "VARCHAR",
    "landing_page": "VARCHAR",
    "citation": "VARCHAR",
}
"""Each catalog entry's `about` block, in the `subdatasets` table."""

_SUPPORT_COLUMNS = {
    "subdatasets": "key VARCHAR, name VARCHAR, kind VARCHAR, organ VARCHAR, labelled BOOLEAN, "
    "raw_dir VARCHAR, table_i_row VARCHAR, "
    + ", ".join(f"{name} {sql}" for name, sql in ABOUT_COLUMNS.items())
    + ", "  # then the published image counts per scale
    + ", ".join(f"published_{scale.lower()} BIGINT" for scale in ALL_SCALES),
    "organs": "organ VARCHAR, position INTEGER",  # Table I order, then other catalog organs
    "manifest_files": "file VARCHAR, subdataset VARCHAR, table_name VARCHAR, "
    "fingerprint VARCHAR, rows BIGINT, loaded_at TIMESTAMP WITH TIME ZONE",  # the load state
    # Kept images per file and category, kept with the tiles: Table I never scans them.
    "tile_counts": "manifest_file VARCHAR, subdataset VARCHAR, kind VARCHAR, scale VARCHAR, "
    "collection VARCHAR, images BIGINT",  # collection: cpia (tiles) | cpia-mini (mini_images)
}

_LINEAGE_VIEW = """
CREATE OR REPLACE VIEW lineage AS
SELECT
    t.subdataset, t.image_name, t.scale, t.kind, t.path, t.parent_image,
    CASE WHEN t.scale = 'XL' THEN t.image_name
         WHEN p.scale = 'XL' THEN p.image_name
         ELSE p.parent_image END AS xl_image,
    t.run_id AS scale_tiles_run_id,
    t.code_version AS scale_tiles_code_version,
    t.standardized_file,
    coalesce(sl.run_id, ri.run_id) AS standardized_wsi_run_id,
    coalesce(sl.code_version, ri.code_version) AS standardized_wsi_code_version,
    coalesce(sl.source_file, t.source_file) AS source_file,
    coalesce(sl.source_sha256, t.source_sha256) AS source_sha256,
    r.sha256 AS raw_sha256,
    r.source AS raw_origin,
    r.run_id AS raw_download_run_id,
    r.code_version AS raw_download_code_version
FROM tiles t
LEFT JOIN tiles p ON p.subdataset = t.subdataset AND p.image_name = t.parent_image
LEFT JOIN slides sl ON sl.subdataset = t.subdataset AND sl.standardized_file = t.standardized_file
LEFT JOIN roi_images ri
    ON t.kind = 'roi' AND ri.subdataset = t.subdataset AND ri.image_name = t.image_name
LEFT JOIN subdatasets d ON d.key = t.subdataset
LEFT JOIN raw_files r ON r.subdataset = t.subdataset
    AND d.raw_dir || '/' || r.rel_path = coalesce(sl.source_file, t.source_file)
"""


def _built_vs_published_sql() -> str:
    lows = [scale.lower() for scale in ALL_SCALES]
    built = ",\n        ".join(
        f"coalesce(sum(c.images) FILTER (WHERE c.scale = '{scale}'), 0)::BIGINT AS built_{low}"
        for scale, low in zip(ALL_SCALES, lows, strict=True)
    )
    compared = ",\n    ".join(
        f"built_{low}, published_{low}, built_{low} / nullif(published_{low}, 0) AS ratio_{low}"
        for low in lows
    )
    published = ", ".join(f"s.published_{low}" for low in lows)
    return f"""
CREATE OR REPLACE VIEW built_vs_published AS
WITH built AS (
    SELECT s.key, s.organ, s.kind, {published},
        {built}
    FROM subdatasets s
    LEFT JOIN tile_counts c ON c.subdataset = s.key AND c.collection = 'cpia'
    GROUP BY ALL
)
SELECT key AS subdataset, organ, kind,
    {compared}
FROM built
"""


def _table_i_sql() -> list[str]:
    counts = ",\n        ".join(
        f"coalesce(sum(i.images) FILTER (WHERE i.kind = '{kind}' AND i.scale = '{scale}'), 0)"
        f'::BIGINT AS "{column}"'
        for column, kind, scale in TABLE_I_COLUMNS
    )
    columns = ", ".join(f'"{column}"' for column, _, _ in TABLE_I_COLUMNS)
    sums = ", ".join(f'sum("{column}")::BIGINT' for column, _, _ in TABLE_I_COLUMNS)
    total = " + ".join(f'"{column}"' for column, _, _ in TABLE_I_COLUMNS)
    macro = f"""
CREATE OR REPLACE MACRO table_i_for(mini_only) AS TABLE
WITH images AS (
    SELECT subdataset, kind, scale, sum(images) AS images
    FROM tile_counts
    WHERE collection = CASE WHEN mini_only THEN 'cpia-mini' ELSE 'cpia' END
    GROUP BY ALL
), organ_rows AS (
    SELECT o.position, o.organ, count(DISTINCT s.key)::BIGINT AS "sub-datasets",
        {counts}
    FROM organs o
    LEFT JOIN subdatasets s ON s.table_i_row = o.organ
    LEFT JOIN images i ON i.subdataset = s.key
    GROUP BY o.position, o.organ
)
SELECT organ, "sub-datasets", {columns}, {total} AS total
FROM (
    SELECT * FROM organ_rows
    UNION ALL
    SELECT NULL, 'Total', sum("sub-datasets")::BIGINT, {sums} FROM organ_rows
)
ORDER BY position NULLS LAST
"""
    return [macro, "CREATE OR REPLACE VIEW table_i AS SELECT * FROM table_i_for(false)"]


_SQL_TYPES = {
    pl.String: "VARCHAR",
    pl.Int32: "INTEGER",
    pl.Int64: "BIGINT",
    pl.Float32: "FLOAT",
    pl.Float64: "DOUBLE",
    pl.Boolean: "BOOLEAN",
}


def _sql_type(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMP WITH TIME ZONE" if dtype.time_zone else "TIMESTAMP"
    return _SQL_TYPES[dtype]


_TABLE_COLUMNS = {
    **{
        table.name: ", ".join(
            f'"{name}" {_sql_type(dtype)}' for name, dtype in table.columns.items()
        )
        for table in RECORD_TABLES
    },
    **_SUPPORT_COLUMNS,
}
SCHEMA_VERSION = hashlib.sha256(repr(_TABLE_COLUMNS).encode()).hexdigest()[:16]
"""Changes whenever a table's columns change; a database of another version is rebuilt."""


# ---------------------------------------------------------------------------------------------
# Connections


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
def _writer(
    path: Path, *, wait_s: float, on_wait: Callable[[str], None] | None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The read-write connection, waiting for short-lived readers (CLI, checks) to let go."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(path, read_only=False, wait_s=wait_s, on_wait=on_wait)
    try:
        yield con
    finally:
        con.close()


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
    config = {} if read_only else {"preserve_insertion_order": False}
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


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the tables and views; a database written with other table columns is rebuilt."""
    con.execute("CREATE TABLE IF NOT EXISTS manifest_meta (schema_version VARCHAR)")
    found = con.execute("SELECT schema_version FROM manifest_meta").fetchall()
    if found != [(SCHEMA_VERSION,)]:
        con.execute("DROP VIEW IF EXISTS lineage")
        con.execute("DROP VIEW IF EXISTS table_i")
        con.execute("DROP VIEW IF EXISTS built_vs_published")
        con.execute("DROP MACRO TABLE IF EXISTS table_i_for")
        for name, columns in _TABLE_COLUMNS.items():
            con.execute(f"DROP TABLE IF EXISTS {name}")
            con.execute(f"CREATE TABLE {name} ({columns})")
        con.execute("DELETE FROM manifest_meta")
        con.execute("INSERT INTO manifest_meta VALUES (?)", [SCHEMA_VERSION])
    for statement in (_LINEAGE_VIEW, *_table_i_sql(), _built_vs_published_sql()):
        con.execute(statement)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class ManifestFile:
    """One per-partition Parquet file as found on disk, before it is read."""

    subdataset: str
    table: str
    path: str  # relative to the data folder
    fingerprint: str


@dataclass(frozen=True)
class LoadReport:
    """What one `load_manifest` call changed."""

    loaded: tuple[ManifestFile, ...]  # new or changed files whose rows were (re)loaded
    removed: tuple[str, ...]  # files gone since the last load; their rows were dropped
    unchanged: int  # files skipped because their fingerprint matched
    problems: tuple[dict[str, str], ...]  # files that could not be loaded (schema.FAILURES rows)
    rows: Mapping[str, int]  # rows per table after the load
    partitions: tuple[str, ...]  # the catalog's keys
    touched: frozenset[str]  # keys with loaded or removed files (removed: maybe not in catalog)

    @property
    def reloaded_partitions(self) -> list[str]:
        return [key for key in self.partitions if key in self.touched]

    @property
    def unchanged_partitions(self) -> list[str]:
        return [key for key in self.partitions if key not in self.touched]


def find_manifest_files(layout: DataLayout, keys: Sequence[str]) -> list[ManifestFile]:
    """Every per-partition Parquet file of `keys`, fingerprinted now.

    Fingerprints are taken before any file is read: a file replaced in between is then read in
    its newer version under the older fingerprint, and simply loaded once more next time.
    """
    found = []
    for key in keys:
        folder = layout.manifest_dir(key)
        for table in RECORD_TABLES:
            for path in sorted(folder.glob(table.pattern)):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # removed since the glob: as if never there
                    continue
                fingerprint = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
                found.append(ManifestFile(key, table.name, layout.relative(path), fingerprint))
    return found


def load_manifest(
    layout: DataLayout,
    catalog: Catalog,
    *,
    wait_s: float = 300,
    on_wait: Callable[[str], None] | None = None,
) -> LoadReport:
    """Bring `manifest.duckdb` up to date with the Parquet records of the catalog's partitions.

    Only new, changed and removed files are touched, in one transaction. A file that cannot be
    used (unreadable, wrong column types, corrupt data pages) is skipped with a `failures` row
    (stage `tile_manifest`); the rows it had from an earlier load are kept and it is retried
    next time. Files of partitions no longer in the catalog are dropped. `wait_s` bounds the
    wait for readers holding the database file open; `on_wait` hears who holds it.
    """
    files = find_manifest_files(layout, catalog.keys)
    unreadable: list[dict[str, str]] = []  # files whose data pages failed a batched insert
    with _writer(layout.duckdb_path, wait_s=wait_s, on_wait=on_wait) as con:
        while True:
            con.begin()
            try:
                changes = _apply_changes(con, layout, catalog, files, unreadable)
                con.commit()
                break
            except _BatchInsertError as exc:
                _rollback(con)
                found = _unreadable_files(layout, exc.batch)
                if not found:  # every file reads: the insert failed for another reason
                    raise _load_error(layout, exc.__cause__) from exc.__cause__
                unreadable.extend(found)  # and load again without them
            except duckdb.Error as exc:
                _rollback(con)
                raise _load_error(layout, exc) from exc
        rows = table_rows(con)
    usable, problems, removed, unchanged = changes
    touched = {probed.file.subdataset for probed in usable}
    touched.update(Path(path).parent.name for path in removed)  # manifests/<key>/<file>
    return LoadReport(
        loaded=tuple(probed.file for probed in usable),
        removed=tuple(removed),
        unchanged=unchanged,
        problems=tuple(problems),
        rows=rows,
        partitions=tuple(catalog.keys),
        touched=frozenset(touched),
    )


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Undo the load's transaction. A failed COMMIT (e.g. disk full) has already ended it, or
    invalidated the database when its checkpoint failed; neither "no transaction is active" nor
    "database has been invalidated" may hide the error that ended it."""
    with suppress(duckdb.TransactionException, duckdb.FatalException):
        con.rollback()


def _load_error(layout: DataLayout, exc: BaseException | None) -> ManifestError:
    """The error of a rolled-back load, saying "disk full" and the path when it is one."""
    cause = output_fault(exc, layout.duckdb_path) if exc is not None else None
    return ManifestError(f"{layout.duckdb_path}: load rolled back: {cause or exc}")


class _BatchInsertError(Exception):
    """A multi-file insert failed: one of `batch` may have unreadable data pages."""

    def __init__(self, batch: Sequence[_Probed]) -> None:
        super().__init__(f"inserting {len(batch)} files failed")
        self.batch = tuple(batch)


def _apply_changes(
    con: duckdb.DuckDBPyConnection,
    layout: DataLayout,
    catalog: Catalog,
    files: Sequence[ManifestFile],
    unreadable: Sequence[dict[str, str]],
) -> tuple[list[_Probed], list[dict[str, str]], list[str], int]:
    """The body of a load's transaction, skipping the files known `unreadable`.

    Returns the files loaded, the problems (unreadable ones included), the removed files and
    the number unchanged.
    """
    ensure_schema(con)
    known = dict(con.execute("SELECT file, fingerprint FROM manifest_files").fetchall())
    removed = sorted(set(known) - {file.path for file in files})
    changed = [file for file in files if known.get(file.path) != file.fingerprint]
    skipped = {problem["file"] for problem in unreadable}
    candidates = [file for file in changed if file.path not in skipped]
    usable, problems = _probe(layout, candidates, _column_types(con))
    problems = [*unreadable, *problems]
    _write_catalog_tables(con, layout, catalog)
    con.execute("DELETE FROM failures WHERE stage = ?", [LOADER_STAGE])
    _drop_files(con, [*removed, *(probed.file.path for probed in usable)])
    for table in RECORD_TABLES:
        batch = [probed for probed in usable if probed.file.table == table.name]
        if batch:
            try:
                _insert_batch(con, layout, table, batch)
            except duckdb.Error as exc:
                raise _BatchInsertError(batch) from exc
    _apply_mini_selection(con, {probed.file.subdataset for probed in usable})
    _record(con, usable, problems)
    return usable, problems, removed, len(files) - len(changed)


def _unreadable_files(layout: DataLayout, batch: Sequence[_Probed]) -> list[dict[str, str]]:
    """Read every loaded column of each file in full: a failure naming each file that fails.

    Only after a batched insert failed. The values are hashed, not counted: DuckDB answers
    counts from the footer's statistics without reading the pages.
    """
    problems = []
    with duckdb.connect() as scratch:
        for probed in batch:
            columns = ", ".join(f'"{name}"' for name in sorted(probed.columns)) or "NULL"
            try:
                scratch.execute(
                    f"SELECT bit_xor(hash({columns})) FROM read_parquet(?)",
                    [str(layout.root / probed.file.path)],
                ).fetchall()
            except duckdb.Error as exc:
                problems.append(_problem(probed.file, f"unreadable Parquet data: {exc}"))
    return problems


@dataclass(frozen=True)
class _Probed:
    """A file whose footer was read: the known columns it has and its row count."""

    file: ManifestFile
    columns: frozenset[str]
    rows: int


def _probe(
    layout: DataLayout, files: Sequence[ManifestFile], expected: Mapping[str, Mapping[str, str]]
) -> tuple[list[_Probed], list[dict[str, str]]]:
    """Read each file's Parquet footer: the columns to load, or a failure naming the file.

    Footers are read on a scratch in-memory connection: an error in the writer's transaction
    would abort the whole load.
    """
    usable, problems = [], []
    with duckdb.connect() as scratch:
        for file in files:
            try:
                found, rows = _footer(scratch, layout.root / file.path)
            except duckdb.Error as exc:
                problems.append(_problem(file, f"not a readable Parquet file: {exc}"))
                continue
            table = _RECORD_TABLE[file.table]
            loadable = [name for name in table.records | schema.RUN_COLUMNS if name in found]
            wrong = [
                f"{name} is {found[name]}, expected {expected[file.table][name]}"
                for name in loadable
                if found[name] != expected[file.table][name]
            ]
            if wrong:
                problems.append(_problem(file, "wrong column types: " + "; ".join(wrong)))
            else:
                usable.append(_Probed(file, frozenset(loadable), rows))
    return usable, problems


def _footer(scratch: duckdb.DuckDBPyConnection, path: Path) -> tuple[dict[str, str], int]:
    """Column types and row count of a Parquet file, from its footer."""
    described = scratch.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
    [(rows,)] = scratch.execute(
        "SELECT num_rows FROM parquet_file_metadata(?)", [str(path)]
    ).fetchall()
    return {name: dtype for name, dtype, *_ in described}, rows


def _problem(file: ManifestFile, reason: str) -> dict[str, str]:
    return {"subdataset": file.subdataset, "file": file.path, "stage": LOADER_STAGE,
            "reason": reason}  # fmt: skip


def _column_types(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'main'"
    ).fetchall()
    types: dict[str, dict[str, str]] = {}
    for table_name, column, data_type in rows:
        types.setdefault(table_name, {})[column] = data_type
    return types


def _drop_files(con: duckdb.DuckDBPyConnection, paths: list[str]) -> None:
    """Delete the rows loaded from these Parquet files, and their load state."""
    if not paths:
        return
    for table in (*(table.name for table in RECORD_TABLES), "tile_counts"):
        con.execute(
            f"DELETE FROM {table} WHERE manifest_file IN (SELECT unnest(?::VARCHAR[]))", [paths]
        )
    con.execute("DELETE FROM manifest_files WHERE file IN (SELECT unnest(?::VARCHAR[]))", [paths])


def _insert_batch(
    con: duckdb.DuckDBPyConnection, layout: DataLayout, table: RecordTable, batch: list[_Probed]
) -> None:
    """Append the rows of several files of one table in one statement.

    One multi-file scan lets DuckDB write whole row groups in parallel (per-file inserts of
    small files are several times slower to commit). The partition key comes from each file's
    folder (manifests/<key>/), not from its rows; columns a file lacks load as NULL.
    """
    columns = [
        name
        for name in table.records | schema.RUN_COLUMNS
        if name != "subdataset" and any(name in probed.columns for probed in batch)
    ]
    selected = "".join(f'"{name}", ' for name in columns)
    root = f"{layout.root}/"
    con.execute(
        f"INSERT INTO {table.name} BY NAME SELECT {selected}"
        "parse_filename(parse_dirpath(filename)) AS subdataset, "
        "substr(filename, ?) AS manifest_file "
        "FROM read_parquet(?, filename = true, union_by_name = true)",
        [len(root) + 1, [root + probed.file.path for probed in batch]],
    )
    if table.name in _COLLECTIONS:
        con.execute(
            f"INSERT INTO tile_counts SELECT manifest_file, subdataset, kind, scale, "
            f"'{_COLLECTIONS[table.name]}', count(*) FROM {table.name} "
            "WHERE path IS NOT NULL AND manifest_file IN (SELECT unnest(?::VARCHAR[])) "
            "GROUP BY ALL",
            [[probed.file.path for probed in batch]],
        )


_COLLECTIONS = {"tiles": "cpia", "mini_images": "cpia-mini"}
"""The image collection each counted table belongs to."""


def _apply_mini_selection(con: duckdb.DuckDBPyConnection, partitions: set[str]) -> None:
    """Copy each touched partition's Mini selection onto its tiles; rejected candidates are
    blank. Tiles of partitions without a selection keep the values of their Parquet files."""
    if not partitions:
        return
    keys = sorted(partitions)
    con.execute(
        "UPDATE tiles SET in_mini = s.in_mini, mini_reason = s.mini_reason FROM mini_selection s "
        "WHERE tiles.subdataset = s.subdataset AND tiles.image_name = s.image_name "
        "AND tiles.scale = s.scale AND tiles.subdataset IN (SELECT unnest(?::VARCHAR[]))",
        [keys],
    )
    con.execute(
        f"UPDATE rejected_tiles SET in_mini = false, mini_reason = '{schema.MiniReason.BLANK}' "
        "WHERE mini_reason IS NULL AND subdataset IN (SELECT unnest(?::VARCHAR[]))",
        [keys],
    )


def _record(
    con: duckdb.DuckDBPyConnection, usable: list[_Probed], problems: list[dict[str, str]]
) -> None:
    """Remember what was loaded (and its fingerprint); list the files that were not."""
    if usable:
        con.executemany(
            "INSERT INTO manifest_files VALUES (?, ?, ?, ?, ?, now())",
            [[p.file.path, p.file.subdataset, p.file.table, p.file.fingerprint, p.rows]
             for p in usable],
        )  # fmt: skip
    if problems:
        con.executemany(
            "INSERT INTO failures (subdataset, file, stage, reason) VALUES (?, ?, ?, ?)",
            [[p["subdataset"], p["file"], p["stage"], p["reason"]] for p in problems],
        )


def _write_catalog_tables(
    con: duckdb.DuckDBPyConnection, layout: DataLayout, catalog: Catalog
) -> None:
    con.execute("DELETE FROM subdatasets")
    placeholders = ", ".join("?" for _ in range(7 + len(ABOUT_COLUMNS) + len(ALL_SCALES)))
    con.executemany(
        f"INSERT INTO subdatasets VALUES ({placeholders})",
        [
            [e.key, e.name, e.kind, e.organ, e.labelled, layout.relative(layout.raw_dir(e.key)),
             e.table_i_organ, *_about_values(e.about),
             *(e.published_counts.get(scale) for scale in ALL_SCALES)]
            for e in catalog.subdatasets
        ],
    )  # fmt: skip
    extra = sorted({e.table_i_organ for e in catalog.subdatasets} - set(TABLE_I_ORGANS))
    con.execute("DELETE FROM organs")
    con.executemany(
        "INSERT INTO organs VALUES (?, ?)",
        [[organ, position] for position, organ in enumerate((*TABLE_I_ORGANS, *extra))],
    )


def _about_values(about: About) -> list[Any]:
    values = about.model_dump()
    values["diseases"] = list(about.diseases)
    values["year"] = str(about.year)
    return [values[name] for name in ABOUT_COLUMNS]


def table_rows(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Rows per record table."""
    return {
        table.name: con.execute(f"SELECT count(*) FROM {table.name}").fetchall()[0][0]
        for table in RECORD_TABLES
    }


# ---------------------------------------------------------------------------------------------
# Queries


def table_i(con: duckdb.DuckDBPyConnection, *, mini_only: bool = False) -> pl.DataFrame:
    """Kept images per organ in the paper's Table I columns, with a Total row."""
    return con.sql("SELECT * FROM table_i_for(?)", params=[mini_only]).pl()


def subdataset_info(
    con: duckdb.DuckDBPyConnection, *, organs: Sequence[str] = (), kinds: Sequence[str] = ()
) -> pl.DataFrame:
    """The catalog's sub-datasets with their organ, Table I row and `about` facts (licence,
    redistributable, stain, diseases, pathology, year, landing page, citation)."""
    columns = ", ".join(["key", "name", "kind", "organ", "table_i_row", "labelled", *ABOUT_COLUMNS])
    return con.sql(
        f"SELECT {columns} FROM subdatasets "
        "WHERE (len(?::VARCHAR[]) = 0 OR organ IN (SELECT unnest(?::VARCHAR[]))) "
        "AND (len(?::VARCHAR[]) = 0 OR kind IN (SELECT unnest(?::VARCHAR[]))) ORDER BY key",
        params=[list(organs), list(organs), list(kinds), list(kinds)],
    ).pl()


def built_vs_published(con: duckdb.DuckDBPyConnection, *, built_only: bool = False) -> pl.DataFrame:
    """Kept images per sub-dataset and scale beside the paper's published counts.

    Columns: subdataset, organ, kind, then per scale (xl, l, m, s) built_<scale>,
    published_<scale> and ratio_<scale> = built / published (NULL where nothing is published).
    `built_only` keeps the sub-datasets with at least one kept image.
    """
    built = " + ".join(f"built_{scale.lower()}" for scale in ALL_SCALES)
    return con.sql(
        f"SELECT * FROM built_vs_published WHERE NOT ? OR {built} > 0 ORDER BY subdataset",
        params=[built_only],
    ).pl()


_FILTER_COLUMNS = {
    "subdatasets": "t.subdataset",
    "scales": "t.scale",
    "kinds": "t.kind",
    "splits": "t.split",
    "labels": "t.label",
    "organs": "d.organ",
}
GROUP_COLUMNS = {
    "subdataset": "t.subdataset",
    "organ": "d.organ",
    "kind": "t.kind",
    "scale": "t.scale",
    "split": "t.split",
    "label": "t.label",
    "in_mini": "t.in_mini",
    "upscaled": "t.upscaled",
}
"""Columns `count_tiles` may group by."""


@dataclass(frozen=True)
class TileFilter:
    """Which kept images to select: each non-empty field keeps rows whose value is listed."""

    subdatasets: tuple[str, ...] = ()
    scales: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    organs: tuple[str, ...] = ()
    mini_only: bool = False

    def where(self) -> tuple[str, list[Any]]:
        """A WHERE clause over `tiles t JOIN subdatasets d` and its bound parameters."""
        clauses = ["t.path IS NOT NULL"]
        params: list[Any] = []
        for name, column in _FILTER_COLUMNS.items():
            values = getattr(self, name)
            if values:
                clauses.append(f"{column} IN ({', '.join('?' for _ in values)})")
                params.extend(values)
        if self.mini_only:
            clauses.append("t.in_mini")
        return " AND ".join(clauses), params


_TILES_FROM = "FROM tiles t LEFT JOIN subdatasets d ON d.key = t.subdataset"


def query_tiles(
    con: duckdb.DuckDBPyConnection,
    tile_filter: TileFilter = TileFilter(),
    *,
    limit: int | None = None,
) -> pl.DataFrame:
    """Kept images (all tile columns plus organ) in a stable order."""
    where, params = tile_filter.where()
    sql = (
        f"SELECT t.*, d.organ {_TILES_FROM} WHERE {where} "
        "ORDER BY t.subdataset, t.scale, t.image_name"
    )
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return con.sql(sql, params=params).pl()


def count_tiles(
    con: duckdb.DuckDBPyConnection,
    tile_filter: TileFilter = TileFilter(),
    *,
    by: Sequence[str] = ("subdataset", "scale"),
) -> pl.DataFrame:
    """Kept images counted per combination of `by` (names from GROUP_COLUMNS)."""
    unknown = [name for name in by if name not in GROUP_COLUMNS]
    if unknown:
        raise ValueError(f"cannot group by {unknown}: choose from {sorted(GROUP_COLUMNS)}")
    where, params = tile_filter.where()
    groups = ", ".join(f"{GROUP_COLUMNS[name]} AS {name}" for name in by)
    select = f"{groups}, count(*) AS images" if by else "count(*) AS images"
    group_by = " GROUP BY ALL ORDER BY ALL" if by else ""
    return con.sql(f"SELECT {select} {_TILES_FROM} WHERE {where}{group_by}", params=params).pl()


def failures(
    con: duckdb.DuckDBPyConnection,
    *,
    subdatasets: Sequence[str] = (),
    stages: Sequence[str] = (),
) -> pl.DataFrame:
    """Recorded failures (file, stage, reason, run id), optionally of some partitions/stages."""
    clauses, params = ["true"], []
    for column, values in (("subdataset", subdatasets), ("stage", stages)):
        if values:
            clauses.append(f"{column} IN ({', '.join('?' for _ in values)})")
            params.extend(values)
    return con.sql(
        "SELECT subdataset, stage, file, reason, run_id, code_version FROM failures"
        f" WHERE {' AND '.join(clauses)} ORDER BY subdataset, stage, file",
        params=params,
    ).pl()


def trace_image(
    con: duckdb.DuckDBPyConnection, image_name: str, *, subdataset: str | None = None
) -> pl.DataFrame:
    """The lineage of an image, source file first, one row per step.

    Columns: subdataset, image_name (the traced image), step, asset, item (file or image name),
    sha256, run_id, code_version. Empty when no kept image has that name. ROI images have no
    standardized slide nor parent tiles; an S tile lists its M parent between XL and itself.
    """
    # With the partition key known, DuckDB skips other partitions' row groups in every join.
    keys = [subdataset] if subdataset is not None else [
        key for (key,) in con.execute(
            "SELECT DISTINCT subdataset FROM tiles WHERE image_name = ? ORDER BY ALL", [image_name]
        ).fetchall()
    ]  # fmt: skip
    rows = [
        row
        for key in keys
        for row in con.sql(
            "SELECT * FROM lineage WHERE image_name = ? AND subdataset = ? ORDER BY scale",
            params=[image_name, key],
        )
        .pl()
        .to_dicts()
    ]
    steps = [step for row in rows for step in _lineage_steps(row)]
    return pl.DataFrame(steps, schema=_TRACE_SCHEMA, orient="row")


_TRACE_SCHEMA = {
    "subdataset": pl.String,
    "image_name": pl.String,
    "step": pl.String,
    "asset": pl.String,
    "item": pl.String,
    "sha256": pl.String,
    "run_id": pl.String,
    "code_version": pl.String,
}


def _lineage_steps(row: Mapping[str, Any]) -> Iterator[tuple[Any, ...]]:
    def step(name: str, asset: str, item: Any, sha256: Any, stage: str) -> tuple[Any, ...]:
        return (row["subdataset"], row["image_name"], name, asset, item, sha256,
                row[f"{stage}_run_id"], row[f"{stage}_code_version"])  # fmt: skip

    yield step("source file", "raw_download", row["source_file"], row["raw_sha256"],
               "raw_download")  # fmt: skip
    if row["kind"] == "roi":
        yield step("ROI image", "standardized_wsi", row["path"], None, "standardized_wsi")
        return
    yield step("standardized slide", "standardized_wsi", row["standardized_file"], None,
               "standardized_wsi")  # fmt: skip
    ancestors = [("XL tile", row["xl_image"])]
    if row["scale"] == "S":
        ancestors.append(("M tile", row["parent_image"]))
    for name, image in ancestors:
        if image != row["image_name"]:
            yield step(name, "scale_tiles", image, None, "scale_tiles")
    yield step(f"{row['scale']} tile", "scale_tiles", row["path"], None, "scale_tiles")


def markdown_table(frame: pl.DataFrame) -> str:
    """A frame as a GitHub markdown table (integers as 1,234; floats to 4 significant digits)."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---:" if dtype.is_numeric() else "---" for dtype in frame.dtypes) + "|"
    body = ["| " + " | ".join(_markdown_cell(value) for value in row) + " |"
            for row in frame.iter_rows()]  # fmt: skip
    return "\n".join([header, rule, *body])


def _markdown_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "; ".join(_markdown_cell(item) for item in value)
    return str(value).replace("|", "\\|")
