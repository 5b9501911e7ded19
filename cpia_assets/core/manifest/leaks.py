"""Near-duplicate search by perceptual hash, for leak audits: how many of an evaluation set's
val/test images have a near-duplicate (TILES / MINI_IMAGES `phash` within a few bits) among the
images a model was pre-trained on.

No all-pairs product (pigeonhole): the 64 bits are split into max_distance + 1 blocks, and two
hashes at most max_distance bits apart differ in at most max_distance blocks, so they agree
exactly on at least one. DuckDB equi-joins queries and candidates on (block, value), each row
unnested into one row per block, and keeps the pairs within max_distance
(`bit_count(xor(a, b))`), each once. The join's hash table holds the queries' blocks; the
candidates stream through it: 20 M random candidate hashes in Parquet x 5000 queries take 3 s
at 4 bits, 8 s at 6 and 28 s at 8 (two cores, 180 MB). Real tissue hashes collide in a block
1.1-2.6x as often as random ones (their first bit, the mean, is nearly always set).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS

_BITS = 64
_QUERY = "__query"


def near_duplicates(
    queries: pl.DataFrame,
    candidates: str | Path | pl.DataFrame,
    *,
    max_distance: int = NEAR_DUPLICATE_BITS,
) -> pl.DataFrame:
    """`queries` (any columns with `phash`) with `near_duplicates`, the number of candidates
    within `max_distance` bits, and `example`, the smallest of their paths (null: none).

    `candidates`: a Parquet file or glob, or a frame, with `path` and `phash` columns; a
    candidate is its path (rows repeating a path and hash count once). Null hashes are ignored:
    a query without one gets a null count.
    """
    if not 0 <= max_distance < _BITS:
        raise ValueError(f"max_distance must be in [0, {_BITS - 1}], got {max_distance}")
    indexed = queries.with_row_index(_QUERY)
    if isinstance(candidates, pl.DataFrame):
        source, params = "candidates", []
    else:
        source, params = "read_parquet(?, union_by_name = true)", [str(candidates)]
    blocks = _blocks(max_distance + 1)
    with duckdb.connect() as con:
        con.register("queries", indexed.select(_QUERY, "phash"))
        if isinstance(candidates, pl.DataFrame):
            con.register("candidates", candidates.select("path", "phash"))
        found = con.sql(
            f"""
            WITH q AS ({_unnested(f"{_QUERY}, phash", "queries", blocks)}),
            c AS ({_unnested("path, phash", source, blocks)}),
            pairs AS (
                SELECT DISTINCT q.{_QUERY}, c.path, c.phash
                FROM q JOIN c USING (block, value)
                WHERE bit_count(xor(q.phash, c.phash)) <= {max_distance}
            )
            SELECT {_QUERY}, count(*) AS near_duplicates, min(path) AS example
            FROM pairs GROUP BY {_QUERY}
            """,
            params=params,
        ).pl()
    counted = pl.when(pl.col("phash").is_not_null()).then(pl.col("near_duplicates").fill_null(0))
    return (
        indexed.join(found, on=_QUERY, how="left")
        .with_columns(near_duplicates=counted)
        .drop(_QUERY)
    )


def _blocks(count: int) -> list[tuple[int, int]]:
    """(shift, mask) of `count` blocks of the 64 bits, of widths differing by at most one."""
    blocks, shift = [], 0
    for index in range(count):
        width = _BITS // count + (index < _BITS % count)
        blocks.append((shift, (1 << width) - 1 if width < _BITS else -1))
        shift += width
    return blocks


def _unnested(columns: str, source: str, blocks: list[tuple[int, int]]) -> str:
    """A query giving each row with a hash of `source` once per block: `block`, its `value`."""
    values = ", ".join(f"(phash >> {shift}) & {mask}" for shift, mask in blocks)
    return (
        f"SELECT {columns}, unnest(range({len(blocks)})) AS block, unnest([{values}]) AS value "
        f"FROM {source} WHERE phash IS NOT NULL"
    )
