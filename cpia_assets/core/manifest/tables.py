"""The manifest's tables and views: what `manifest.duckdb` holds (`ensure_schema`).

Record tables (`tiles`, `rejected_tiles`, `roi_images`, `slides`, `raw_files`, `failures`,
`skipped`, `mini_images`, `mini_selection`) hold the Parquet columns (`core/schema.py`) plus
`subdataset` (the partition key, from the folder) and `manifest_file` (the Parquet file each
row came from). `subdatasets` and `organs` come from the catalog; `manifest_files` is the load
state; `tile_counts` keeps image counts per file and collection (`cpia`, `cpia-mini`) so
Table I never scans the tiles. Views: `lineage` (a kept image, its parent tiles, standardized
slide and source file, with each stage's run id and code version), `table_i` (the paper's
Table I, each sub-dataset counted under its catalog `table_i_organ`) and `built_vs_published`.
Identifiers in SQL come from this module's constants, never from users.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import duckdb
import polars as pl

from cpia_assets.core import schema
from cpia_assets.core.catalog.fields import ALL_SCALES


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
RECORD_TABLE_BY_NAME = {table.name: table for table in RECORD_TABLES}

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


def table_rows(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Rows per record table."""
    return {
        table.name: con.execute(f"SELECT count(*) FROM {table.name}").fetchall()[0][0]
        for table in RECORD_TABLES
    }
