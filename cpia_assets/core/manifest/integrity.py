"""Integrity checks of the loaded manifest against the image folders and the CPIA spec.

Each check returns a `CheckOutcome` (passed, a one-line summary, JSON-friendly details with
counts and a few examples); the Dagster shell turns them into asset check results.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from cpia_assets.core.layout import SCALE_FOLDER_OF, SCALE_FOLDERS, DataLayout
from cpia_assets.core.schema import MiniReason
from cpia_assets.core.wsi.tiling import xl_ratio_text

TILE_EDGE_PX = {"XL": 3840, "L": 960, "M": 384, "S": 96}
"""Nominal WSI tile edge per scale at the standard resolution (the spec's scale table)."""

PARENT_SCALE = {"L": "XL", "M": "XL", "S": "M"}
"""L and M tiles are cut from an XL tile, S tiles from an M tile."""

MAX_PER_XL = {"L": 16, "M": 100, "S": 160}
"""Full CPIA keeps at most a 4x4 L grid, a 10x10 M grid and a 10% sample of 1600 S cells."""

MAX_MINI_PER_XL = {"L": 16, "M": 32, "S": 32}
"""CPIA-Mini takes 16 L, 32 M and 32 S per XL tile."""

EXAMPLES = 10
"""How many offending items a check lists in its details."""


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict, a one-line summary and JSON-friendly details (counts, examples)."""

    passed: bool
    summary: str
    details: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Manifest rows versus files on disk


@dataclass
class FileComparison:
    """Kept-image rows of the manifest compared with the files under cpia/ and cpia-mini/."""

    rows: int = 0
    files: int = 0
    # "missing": rows without their file; "wrong_size": files of another size than recorded;
    # "orphans": files no row points to.
    problems: Counter[str] = field(default_factory=Counter)
    examples: defaultdict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def note(self, kind: str, items: list[Any]) -> None:
        """Count `items` as problems of `kind`; keep the first few as examples."""
        self.problems[kind] += len(items)
        self.examples[kind].extend(items[: EXAMPLES - len(self.examples[kind])])


def compare_files(con: duckdb.DuckDBPyConnection, layout: DataLayout) -> FileComparison:
    """Walk each sub-dataset's image folders and match them with its rows, one at a time:
    cpia/ with the `tiles` rows, cpia-mini/ with the `mini_images` rows.

    Hidden entries (in-flight atomic writes) are ignored; files directly under <top>/<scale>/
    or in folders of sub-datasets without rows are orphans.
    """
    comparison = FileComparison()
    for table, top in (("tiles", layout.cpia_dir), ("mini_images", layout.mini_dir)):
        keys = {
            row[0] for row in con.execute(f"SELECT DISTINCT subdataset FROM {table}").fetchall()
        }
        for folder in SCALE_FOLDERS:
            for entry in _visible_entries(top / folder):
                if entry.is_dir(follow_symlinks=False):
                    keys.add(entry.name)
                else:
                    comparison.files += 1
                    comparison.note("orphans", [layout.relative(Path(entry.path))])
        for key in sorted(keys):
            _compare_subdataset(con, layout, (table, top), key, comparison)
    return comparison


def _compare_subdataset(
    con: duckdb.DuckDBPyConnection,
    layout: DataLayout,
    tree: tuple[str, Path],
    key: str,
    comparison: FileComparison,
) -> None:
    table, top = tree
    rows = con.sql(
        f"SELECT path, bytes FROM {table} WHERE subdataset = ? AND path IS NOT NULL", params=[key]
    ).pl()
    listed: list[tuple[str, int]] = []
    for folder in SCALE_FOLDERS:
        images = top / folder / key
        listed += _walk_files(images, f"{layout.relative(images)}/")
    files = pl.DataFrame(listed, schema={"path": pl.String, "size": pl.Int64}, orient="row")
    comparison.rows += rows.height
    comparison.files += files.height
    unlisted = rows.join(files, on="path", how="anti")
    # A row may point outside its sub-dataset's folders: look for such files one by one.
    missing = [path for path in unlisted["path"] if not (layout.root / path).is_file()]
    comparison.note("missing", missing)
    sizes = rows.join(files, on="path", how="inner").filter(
        pl.col("bytes").is_not_null() & (pl.col("bytes") != pl.col("size"))
    )
    comparison.note("wrong_size", sizes.select("path", "bytes", "size").rows())
    comparison.note("orphans", files.join(rows, on="path", how="anti")["path"].to_list())


def _visible_entries(folder: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            yield from (entry for entry in entries if not entry.name.startswith("."))
    except FileNotFoundError:
        return


def _walk_files(folder: Path, prefix: str) -> Iterator[tuple[str, int]]:
    """(prefix + path below `folder`, size) of every visible file below it, recursively.

    Paths are built as strings: resolving each of millions of paths would cost more than the
    walk itself.
    """
    for entry in _visible_entries(folder):
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_files(Path(entry.path), f"{prefix}{entry.name}/")
        else:
            yield prefix + entry.name, entry.stat().st_size


def rows_have_files(comparison: FileComparison) -> CheckOutcome:
    """Every kept-image row (CPIA and Mini) has its file, of the recorded size."""
    missing, wrong_size = comparison.problems["missing"], comparison.problems["wrong_size"]
    return CheckOutcome(
        passed=missing + wrong_size == 0,
        summary=(
            f"{comparison.rows} rows: {missing} files missing, "
            f"{wrong_size} of another size than recorded"
        ),
        details={
            "rows": comparison.rows,
            "missing": missing,
            "wrong_size": wrong_size,
            "missing_examples": comparison.examples["missing"],
            "wrong_size_examples": [
                {"path": path, "recorded": recorded, "actual": actual}
                for path, recorded, actual in comparison.examples["wrong_size"]
            ],
        },
    )


def no_orphan_files(comparison: FileComparison) -> CheckOutcome:
    """No image file under cpia/ or cpia-mini/ lacks a manifest row."""
    orphans = comparison.problems["orphans"]
    return CheckOutcome(
        passed=orphans == 0,
        summary=f"{comparison.files} files: {orphans} without a manifest row",
        details={
            "files": comparison.files,
            "orphans": orphans,
            "orphan_examples": comparison.examples["orphans"],
        },
    )


# ---------------------------------------------------------------------------------------------
# Tile hierarchy and names


def _values(mapping: Mapping[str, Any], *columns: str) -> str:
    """A VALUES list of (key, value) pairs for SQL, from this module's constants."""
    rows = ", ".join(
        "(" + ", ".join(repr(v) if v is not None else "NULL" for v in (key, value)) + ")"
        for key, value in mapping.items()
    )
    return f"(VALUES {rows}) AS v({', '.join(columns)})"


_PARENT_SCALES = ", ".join(f"'{scale}'" for scale in sorted(set(PARENT_SCALE.values())))


_LINKS = f"""
WITH wsi AS (
    SELECT subdataset, image_name, scale, parent_image, x, y, in_mini
    FROM tiles WHERE kind = 'wsi' AND path IS NOT NULL AND subdataset = ?
), edges AS (SELECT * FROM {_values(TILE_EDGE_PX, "scale", "edge")}),
parents AS (SELECT * FROM {_values(PARENT_SCALE, "scale", "parent_scale")}),
links AS (
    SELECT c.subdataset, c.image_name, c.scale, c.in_mini,
        p.image_name AS parent,
        CASE WHEN p.scale = 'XL' THEN p.image_name ELSE p.parent_image END AS xl_image,
        p.image_name IS NOT NULL AND (
            c.x * ce.edge // pe.edge <> p.x OR c.y * ce.edge // pe.edge <> p.y
        ) AS outside
    FROM wsi c
    JOIN parents ps ON ps.scale = c.scale
    JOIN edges ce ON ce.scale = c.scale
    LEFT JOIN (SELECT * FROM wsi WHERE scale IN ({_PARENT_SCALES})) p
        ON p.image_name = c.parent_image AND p.scale = ps.parent_scale
    LEFT JOIN edges pe ON pe.scale = p.scale
)
"""
"""The WSI L/M/S tiles of one sub-dataset (the `?` to bind) joined to their parents (`links`):
the parent lookup of a whole 149 M manifest spills to disk, one sub-dataset's fits in memory
(and needs no sub-dataset in its join or grouping keys)."""


def ratios_within_spec(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    """Each WSI L/M/S tile lies inside an existing parent; children per XL within the spec.
    One pass of the parent lookup per sub-dataset (links never cross one) counts both; a
    sub-dataset's broken tiles are listed by a second pass only when it has some."""
    per_scale = ", ".join(
        f"count(*) FILTER (WHERE scale = '{scale}') AS {scale}, "
        f"count(*) FILTER (WHERE scale = '{scale}' AND in_mini) AS mini_{scale}"
        for scale in PARENT_SCALE
    )
    too_many = " OR ".join(
        [f"{scale} > {limit}" for scale, limit in MAX_PER_XL.items()]
        + [f"mini_{scale} > {limit}" for scale, limit in MAX_MINI_PER_XL.items()]
    )
    crowded, crowded_count, broken, broken_count = [], 0, [], 0
    for (subdataset,) in con.execute(  # sorted: each's sorted examples append in order
        "SELECT DISTINCT subdataset FROM tiles WHERE kind = 'wsi' ORDER BY ALL"
    ).fetchall():
        rows = con.execute(  # its crowded XL tiles (part 0), then its number of broken tiles
            _LINKS + ", per_xl AS MATERIALIZED (SELECT any_value(subdataset) AS subdataset, "
            f"xl_image, {per_scale}, count(*) FILTER (WHERE parent IS NULL OR outside) AS broken "
            "FROM links GROUP BY xl_image) "
            "SELECT * FROM (SELECT 0 AS part, subdataset, xl_image, L, M, S, count(*) OVER () "
            f"FROM per_xl WHERE xl_image IS NOT NULL AND ({too_many}) ORDER BY ALL LIMIT ?) "
            "UNION ALL SELECT 1, NULL, NULL, NULL, NULL, NULL, sum(broken) FROM per_xl "
            "ORDER BY ALL",
            [subdataset, EXAMPLES],
        ).fetchall()
        *found, (*_, broken_here) = [row[1:] for row in rows]
        crowded_count += found[0][-1] if found else 0
        crowded = (crowded + [row[:-1] for row in found])[:EXAMPLES]
        if broken_here:  # listed by a second pass, only where there are some
            broken_count += broken_here
            broken = (broken + con.execute(
                _LINKS + "SELECT subdataset, image_name, scale, parent, outside "
                "FROM links WHERE parent IS NULL OR outside ORDER BY ALL LIMIT ?",
                [subdataset, EXAMPLES],
            ).fetchall())[:EXAMPLES]  # fmt: skip
    [(xl, *children)] = con.execute(
        "SELECT count(*) FILTER (WHERE scale = 'XL'), "
        + ", ".join(f"count(*) FILTER (WHERE scale = '{scale}')" for scale in PARENT_SCALE)
        + " FROM tiles WHERE kind = 'wsi' AND path IS NOT NULL"
    ).fetchall()
    ratio = xl_ratio_text(dict(zip(("XL", *PARENT_SCALE), (xl, *children), strict=True)))
    return CheckOutcome(
        passed=broken_count == 0 and crowded_count == 0,
        summary=(
            f"{xl} XL tiles, XL:L:M:S = {ratio}; {broken_count} tiles without a parent or "
            f"outside it, {crowded_count} XL tiles with more children than the spec allows"
        ),
        details={
            "xl_tiles": xl,
            "ratio_XL_L_M_S": ratio,
            "max_per_xl": dict(MAX_PER_XL),
            "max_mini_per_xl": dict(MAX_MINI_PER_XL),
            "broken_links": broken_count,
            "broken_examples": [
                {"subdataset": s, "image": i, "scale": sc, "parent": p, "outside_parent": o}
                for s, i, sc, p, o in broken
            ],
            "crowded_xl_tiles": crowded_count,
            "crowded_examples": [
                {"subdataset": s, "xl_image": x, "L": n_l, "M": n_m, "S": n_s}
                for s, x, n_l, n_m, n_s in crowded
            ],
        },
    )


def unique_names_per_folder(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    """No two kept images share a name inside one folder cpia/<L|M|S>/<sub-dataset>/.

    XL and L tiles share the L folder; ROI images keep their source names, so two sources
    files that differ only by extension would collide there. One query per sub-dataset (folders
    never span two): a whole 149 M manifest's grouping outgrows the memory, one's fits.
    """
    folder = (
        "CASE scale "
        + " ".join(f"WHEN '{scale}' THEN '{top}'" for scale, top in SCALE_FOLDER_OF.items())
        + " END"
    )
    duplicates, count = [], 0
    for (subdataset,) in con.execute(
        "SELECT DISTINCT subdataset FROM tiles WHERE path IS NOT NULL ORDER BY ALL"
    ).fetchall():
        found = con.execute(  # grouped by a 64-bit hash first: the names only where it repeats
            f"WITH kept AS (SELECT {folder} AS folder, image_name, hash(folder, image_name) AS key "
            "FROM tiles WHERE path IS NOT NULL AND subdataset = ?), "
            "repeated AS (SELECT key FROM kept GROUP BY key HAVING count(*) > 1) "
            "SELECT count(*) AS copies, folder, image_name, count(*) OVER () FROM kept "
            "WHERE key IN (SELECT key FROM repeated) GROUP BY ALL HAVING count(*) > 1 "
            "ORDER BY copies DESC, folder, image_name LIMIT ?",
            [subdataset, EXAMPLES],
        ).fetchall()
        count += found[0][-1] if found else 0
        duplicates += [(-copies, top, subdataset, name) for copies, top, name, _ in found]
    return CheckOutcome(
        passed=count == 0,
        summary=f"{count} image names used more than once within a folder",
        details={
            "duplicate_names": count,
            "examples": [  # the most copied first, across sub-datasets
                {"folder": f"{top}/{key}", "image": name, "copies": -negated}
                for negated, top, key, name in sorted(duplicates)[:EXAMPLES]
            ],
        },
    )


_MINI_PER_XL = f"""
WITH mini AS (
    SELECT subdataset, image_name, scale, parent_image FROM mini_images WHERE kind = 'wsi'
), children AS (
    SELECT c.subdataset, c.scale,
        CASE WHEN c.scale = 'S' THEN m.parent_image ELSE c.parent_image END AS xl_image
    FROM mini c
    LEFT JOIN mini m ON c.scale = 'S' AND m.scale = 'M' AND m.subdataset = c.subdataset
        AND m.image_name = c.parent_image
    WHERE c.scale <> 'XL'
), mini_counts AS (
    SELECT subdataset, xl_image, count(*) FILTER (WHERE scale = 'L') AS l,
        count(*) FILTER (WHERE scale = 'M') AS m, count(*) FILTER (WHERE scale = 'S') AS s
    FROM children GROUP BY ALL
), kept AS (
    SELECT subdataset, parent_image AS xl_image, count(*) FILTER (WHERE scale = 'L') AS l,
        count(*) FILTER (WHERE scale = 'M') AS m
    FROM tiles
    WHERE kind = 'wsi' AND path IS NOT NULL AND scale IN ('L', 'M')
        AND mini_reason IS DISTINCT FROM '{MiniReason.EXCLUDED}'
    GROUP BY ALL
), per_xl AS (
    SELECT x.subdataset, x.image_name AS xl_image, coalesce(c.l, 0) AS l,
        coalesce(c.m, 0) AS m, coalesce(c.s, 0) AS s, coalesce(k.l, 0) AS kept_l,
        coalesce(k.m, 0) AS kept_m
    FROM mini x
    LEFT JOIN mini_counts c ON c.subdataset = x.subdataset AND c.xl_image = x.image_name
    LEFT JOIN kept k ON k.subdataset = x.subdataset AND k.xl_image = x.image_name
    WHERE x.scale = 'XL'
)
"""


_MINI_EXAMPLE_FIELDS = ("subdataset", "xl_image", "L", "M", "S", "kept_L", "kept_M")


def mini_ratios(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    """Per Mini XL tile: every kept L tile (at most 16), min(32, kept M) M tiles and one S crop
    per Mini M tile; and every Mini L/M/S image has its Mini XL tile."""
    limit_l, limit_m = MAX_MINI_PER_XL["L"], MAX_MINI_PER_XL["M"]
    off = con.execute(
        _MINI_PER_XL + "SELECT subdataset, xl_image, l, m, s, kept_l, kept_m, count(*) OVER () "
        f"FROM per_xl WHERE l <> least(kept_l, {limit_l}) OR m <> least(kept_m, {limit_m}) "
        "OR s <> m ORDER BY ALL LIMIT ?",
        [EXAMPLES],
    ).fetchall()
    [(orphans,)] = con.execute(
        _MINI_PER_XL + "SELECT count(*) FROM children c WHERE NOT EXISTS (SELECT 1 FROM mini x "
        "WHERE x.scale = 'XL' AND x.subdataset = c.subdataset AND x.image_name = c.xl_image)"
    ).fetchall()
    counts = dict(
        con.execute(
            "SELECT scale, count(*) FROM mini_images WHERE kind = 'wsi' GROUP BY ALL"
        ).fetchall()
    )
    off_count = off[0][-1] if off else 0
    ratio = xl_ratio_text(counts)
    return CheckOutcome(
        passed=off_count == 0 and orphans == 0,
        summary=(
            f"Mini {counts.get('XL', 0)} XL tiles, XL:L:M:S = {ratio}; {off_count} XL tiles "
            f"off 16/32/32 (beyond fewer kept sub-tiles), {orphans} images without a Mini XL"
        ),
        details={
            "ratio_XL_L_M_S": ratio,
            "max_mini_per_xl": dict(MAX_MINI_PER_XL),
            "xl_tiles_off": off_count,
            "images_without_xl": orphans,
            "examples": [dict(zip(_MINI_EXAMPLE_FIELDS, row[:-1], strict=True)) for row in off],
        },
    )


# ---------------------------------------------------------------------------------------------
# Raw files accounted for

_UNACCOUNTED = """
WITH standardized AS (  -- partitions whose standardized_wsi wrote its skipped files
    SELECT DISTINCT subdataset FROM manifest_files WHERE table_name = 'skipped'
), raw AS (
    SELECT r.subdataset, d.raw_dir || '/' || r.rel_path AS file,
        r.subdataset IN (SELECT subdataset FROM standardized) AS checked
    FROM raw_files r JOIN subdatasets d ON d.key = r.subdataset
), ends AS (
    SELECT subdataset, source_file AS file FROM slides
    UNION ALL SELECT subdataset, source_file FROM roi_images
    UNION ALL SELECT subdataset, file FROM failures
    UNION ALL SELECT subdataset, file FROM skipped
)
"""


def raw_files_accounted(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    """Every raw file of a standardized partition ends as an output (a standardized slide or
    an ROI image), a failure or a skip with its reason: nothing is left out silently.

    Partitions whose standardized_wsi has not run yet are counted as pending, not checked.
    """
    [(raw, checked, pending)] = con.execute(
        _UNACCOUNTED + "SELECT count(*), count(*) FILTER (WHERE checked), "
        "count(DISTINCT subdataset) FILTER (WHERE NOT checked) FROM raw"
    ).fetchall()
    lost = con.execute(
        _UNACCOUNTED + "SELECT subdataset, file, count(*) OVER () FROM raw "
        "WHERE checked AND NOT EXISTS (SELECT 1 FROM ends e "
        "WHERE e.subdataset = raw.subdataset AND e.file = raw.file) ORDER BY ALL LIMIT ?",
        [EXAMPLES],
    ).fetchall()
    count = lost[0][-1] if lost else 0
    return CheckOutcome(
        passed=count == 0,
        summary=(
            f"{checked} of {raw} raw files checked: {count} neither an output, a failure nor "
            f"a skip; {pending} partitions not standardized yet"
        ),
        details={
            "raw_files": raw,
            "checked": checked,
            "unaccounted": count,
            "pending_partitions": pending,
            "unaccounted_examples": [{"subdataset": key, "file": file} for key, file, _ in lost],
        },
    )


# ---------------------------------------------------------------------------------------------
# All checks

CHECKS = {
    "rows_have_files": (
        "Every kept-image row has its file under cpia/ (Mini: cpia-mini/), of the recorded size."
    ),
    "no_orphan_files": "No image file under cpia/{L,M,S}/ or cpia-mini/{L,M,S}/ lacks a row.",
    "ratios_within_spec": (
        "Each WSI L/M/S tile lies inside an existing parent tile, and no XL tile has more "
        "children than the spec allows (16 L, 100 M, 160 S; Mini 16, 32, 32)."
    ),
    "unique_names_per_folder": (
        "No image name is used twice in one folder `cpia/<L|M|S>/<sub-dataset>/`."
    ),
    "raw_files_accounted": (
        "Every raw file of a standardized partition ends as an output (standardized slide or "
        "ROI image), a failure, or a skip with its reason."
    ),
    "mini_ratios": (
        "CPIA-Mini is 1:16:32:32 per XL tile, allowing for XL tiles with fewer kept sub-tiles: "
        "each Mini XL tile has all its kept L tiles (at most 16), min(32, kept M) M tiles and "
        "exactly one S crop per Mini M tile, and every Mini L/M/S image has its Mini XL tile."
    ),
}
"""Check name -> what it verifies."""


def run_checks(
    con: duckdb.DuckDBPyConnection, layout: DataLayout, names: Iterable[str] = tuple(CHECKS)
) -> dict[str, CheckOutcome]:
    """The named checks' outcomes, in CHECKS order; the folders are walked once for both
    file checks."""
    wanted = set(names)
    unknown = wanted - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}: choose from {list(CHECKS)}")
    outcomes: dict[str, CheckOutcome] = {}
    if wanted & {"rows_have_files", "no_orphan_files"}:
        comparison = compare_files(con, layout)
        outcomes["rows_have_files"] = rows_have_files(comparison)
        outcomes["no_orphan_files"] = no_orphan_files(comparison)
    if "ratios_within_spec" in wanted:
        outcomes["ratios_within_spec"] = ratios_within_spec(con)
    if "unique_names_per_folder" in wanted:
        outcomes["unique_names_per_folder"] = unique_names_per_folder(con)
    if "raw_files_accounted" in wanted:
        outcomes["raw_files_accounted"] = raw_files_accounted(con)
    if "mini_ratios" in wanted:
        outcomes["mini_ratios"] = mini_ratios(con)
    return {name: outcomes[name] for name in CHECKS if name in wanted}
