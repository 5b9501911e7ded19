"""What users ask of the manifest, answered as Polars frames: Table I, built vs published,
kept images by filter and their counts, failures, an image's lineage, markdown tables.

User values reach SQL only as bound parameters. `trace_image` filters the `lineage` view by
`subdataset` as well as `image_name`, so DuckDB reads one partition's row groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl

from cpia_assets.core.catalog.fields import ALL_SCALES
from cpia_assets.core.manifest.tables import ABOUT_COLUMNS


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
