"""`load_manifest`: the per-partition Parquet records loaded into DuckDB, incrementally.

A load compares each Parquet file's fingerprint (size, mtime, inode: an atomic rewrite always
changes the inode) with the one recorded when the file was last loaded, and replaces the rows of
changed files only, in one transaction: readers see the manifest before or after a load, never
half of one. Each load copies `mini_selection` (written by cpia_mini) onto the `in_mini` and
`mini_reason` columns of the tiles of the partitions it touched; rejected candidates are `blank`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from cpia_assets.core import schema
from cpia_assets.core.catalog.fields import ALL_SCALES, TABLE_I_ORGANS
from cpia_assets.core.catalog.model import About, Catalog
from cpia_assets.core.fsutil import output_fault
from cpia_assets.core.layout import DataLayout
from cpia_assets.core.manifest.database import ManifestError, writer
from cpia_assets.core.manifest.tables import (
    ABOUT_COLUMNS,
    RECORD_TABLE_BY_NAME,
    RECORD_TABLES,
    RecordTable,
    ensure_schema,
    table_rows,
)

LOADER_STAGE = "tile_manifest"
"""The `failures.stage` of Parquet files the loader could not use (kept until they load)."""


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
    with writer(layout.duckdb_path, wait_s=wait_s, on_wait=on_wait) as con:
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
        for same_columns in _by_columns(batch):
            try:
                _insert_batch(con, layout, table, same_columns)
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
    found: frozenset[tuple[str, str]] = frozenset()  # every column of the file, with its type


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
            table = RECORD_TABLE_BY_NAME[file.table]
            loadable = [name for name in table.records | schema.RUN_COLUMNS if name in found]
            wrong = [
                f"{name} is {found[name]}, expected {expected[file.table][name]}"
                for name in loadable
                if found[name] != expected[file.table][name]
            ]
            if wrong:
                problems.append(_problem(file, "wrong column types: " + "; ".join(wrong)))
            else:
                usable.append(_Probed(file, frozenset(loadable), rows, frozenset(found.items())))
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


def _by_columns(batch: Sequence[_Probed]) -> list[list[_Probed]]:
    """The files of a batch grouped by their columns and types (usually one group), in order."""
    groups: dict[frozenset[tuple[str, str]], list[_Probed]] = {}
    for probed in batch:
        groups.setdefault(probed.found, []).append(probed)
    return list(groups.values())


def _insert_batch(
    con: duckdb.DuckDBPyConnection, layout: DataLayout, table: RecordTable, batch: list[_Probed]
) -> None:
    """Append the rows of several files of one table, all with the same loaded columns, in one
    statement (the rows never pass through Python).

    One multi-file scan lets DuckDB write whole row groups in parallel (per-file inserts of
    small files are several times slower to commit); files with the same columns need no
    `union_by_name` (which costs about twice the scan). The partition key comes from each
    file's folder (manifests/<key>/), not from its rows; columns a file lacks load as NULL.
    """
    columns = [
        name
        for name in table.records | schema.RUN_COLUMNS
        if name != "subdataset" and any(name in probed.columns for probed in batch)
    ]
    selected = "".join(f'"{name}", ' for name in columns)
    root = f"{layout.root}/"
    union = len({probed.found for probed in batch}) > 1
    con.execute(
        f"INSERT INTO {table.name} BY NAME SELECT {selected}"
        "parse_filename(parse_dirpath(filename)) AS subdataset, "
        "substr(filename, ?) AS manifest_file "
        f"FROM read_parquet(?, filename = true, union_by_name = {str(union).lower()})",
        [len(root) + 1, [root + probed.file.path for probed in batch]],
    )
    if table.name not in _COLLECTIONS:
        return
    collection = _COLLECTIONS[table.name]
    if all({"kind", "scale", "path"} <= probed.columns for probed in batch):
        # Counted from the files just loaded: a reload never scans the whole table.
        con.execute(
            "INSERT INTO tile_counts SELECT substr(filename, ?) AS manifest_file, "
            f"parse_filename(parse_dirpath(filename)) AS subdataset, kind, scale, '{collection}', "
            f"count(*) FROM read_parquet(?, filename = true, union_by_name = {str(union).lower()}) "
            "WHERE path IS NOT NULL GROUP BY ALL",
            [len(root) + 1, [root + probed.file.path for probed in batch]],
        )
    else:
        con.execute(
            f"INSERT INTO tile_counts SELECT manifest_file, subdataset, kind, scale, "
            f"'{collection}', count(*) FROM {table.name} "
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
