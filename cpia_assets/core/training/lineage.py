"""`cpia lineage`: a shard sample, a CPIA-Mini image or a full-CPIA image traced back to the
raw file it came from, through every stage, from the manifest (read-only) and the export's
`samples.parquet` and `index.json`.

The chain, from what was asked down to the source: shard sample (export, tar file) -> Mini
image -> full-CPIA tile (scale, grid position, pixel origin, path) -> its parent tiles (an S
tile's M tile, then the XL tile) -> standardized slide (TIFF; ROI images have none) -> raw
source file (path under raw/, sha256, bytes, where it was fetched from) -> sub-dataset.

A sample key is `<subdataset>__<scale>__<encoded name>` (`shards.sample_key`). Which tar holds
it follows from the export's seeded shuffle (`index.json`: seed, shard_size), and is checked
against the tar's members (every tar is searched if that check fails).

Lives with the training stage because it reads the exports; it only reads.
"""

from __future__ import annotations

import json
import tarfile
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from cpia_assets.core.layout import DataLayout
from cpia_assets.core.training import shards
from cpia_assets.core.training.shards import INDEX_FILE, SAMPLES_FILE


class LineageError(LookupError):
    """What was asked for is not there; the message names it and where it was looked for."""


@dataclass
class Step:
    """One link of a chain: what it is, the asset that made it, its file or name."""

    step: str
    asset: str
    item: str | None
    sha256: str | None = None
    run_id: str | None = None
    code_version: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


Chain = list[Step]


def trace(
    con: duckdb.DuckDBPyConnection,
    layout: DataLayout,
    query: str,
    *,
    export: str | None = None,
    subdataset: str | None = None,
    mini: bool = False,
) -> list[Chain]:
    """The chains of what `query` names (one per match; a name can repeat across sub-datasets):
    a shard sample key (with `export`, or of any export when it looks like a key), an image
    path (Mini or full CPIA, relative to the data folder or absolute), or an image name (the
    full-CPIA image; with `mini`, or when no full-CPIA image has it, the Mini image)."""
    if export is not None or _looks_like_key(query):
        return [_sample_chain(con, layout, query, export)]
    if "/" in query or query.lower().endswith((".jpg", ".jpeg")):
        return [_path_chain(con, layout, query)]
    found: list[Chain] = []
    if not mini:
        tiles = _images(con, "tiles", "image_name", query, subdataset)
        found = [_tile_chain(con, row) for row in tiles]
    if not found:
        minis = _images(con, "mini_images", "image_name", query, subdataset)
        found = [_mini_chain(con, row) for row in minis]
    if not found:
        where = f" in sub-dataset {subdataset!r}" if subdataset else ""
        if mini:
            raise LineageError(f"no Mini image named {query!r}{where} in the manifest")
        raise LineageError(
            f"no kept image named {query!r}{where} in the manifest (nor a Mini image)"
        )
    return found


def _looks_like_key(query: str) -> bool:
    parts = query.split("__")
    return len(parts) >= 3 and "/" not in query and parts[1] in {"XL", "L", "M", "S"}


# --- shard samples -------------------------------------------------------------------------


def _sample_chain(
    con: duckdb.DuckDBPyConnection, layout: DataLayout, key: str, export: str | None
) -> Chain:
    key = key.removesuffix(".jpg").removesuffix(".json")
    exports = [export] if export else sorted(
        path.parent.name for path in (layout.root / "shards").glob(f"*/{SAMPLES_FILE}")
    )  # fmt: skip
    if not exports:
        raise LineageError(f"{layout.root / 'shards'}: no export with a {SAMPLES_FILE}")
    for name in exports:
        folder = layout.shards_dir(name)
        samples_path = folder / SAMPLES_FILE
        if not samples_path.is_file():
            raise LineageError(
                f"export {name!r}: {samples_path} does not exist (materialize training_shards "
                f"for {name})"
            )
        with duckdb.connect() as scratch:  # the samples file is read where it lies
            found = scratch.sql(
                "SELECT * FROM read_parquet(?) WHERE key = ?", params=[str(samples_path), key]
            ).pl()
            if found.is_empty():
                continue
            sample = found.row(0, named=True)
            tar, position = _shard_of(scratch, folder, key)
        step = Step("shard sample", "training_shards", key, details={
            "export": name, "shard": None if tar is None else layout.relative(tar),
            "position in shard": position, "image": sample["path"], "phash": sample.get("phash"),
        })  # fmt: skip
        return [step, *_path_chain(con, layout, sample["path"])]
    where = f"export {export!r}" if export else f"the exports {', '.join(exports)}"
    raise LineageError(f"no sample with key {key!r} in {where}")


def _shard_of(
    scratch: duckdb.DuckDBPyConnection, folder: Path, key: str
) -> tuple[Path | None, int | None]:
    """The tar holding `key` and its place in it: the sample's rank in the export's seeded
    shuffle (`shards.shuffle_order`, seed and shard size from the index) names the tar, whose
    members confirm it; failing that, every tar is searched."""
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
        (place,) = scratch.execute(
            "SELECT n FROM (SELECT key, row_number() OVER "
            f"(ORDER BY {shards.shuffle_order(index['seed'])}) - 1 AS n FROM read_parquet(?)) "
            "WHERE key = ?",
            [str(folder / SAMPLES_FILE), key],
        ).fetchone()
        guess = folder / index["shards"][place // int(index["shard_size"])]["file"]
        members = _members(guess)
        if f"{key}.jpg" in members:
            return guess, members[f"{key}.jpg"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, tarfile.TarError,
            duckdb.Error):  # fmt: skip
        pass
    for tar in sorted(folder.glob("*.tar")):
        members = _members(tar)
        if f"{key}.jpg" in members:
            return tar, members[f"{key}.jpg"]
    return None, None


def _members(tar: Path) -> dict[str, int]:
    """Image members of a shard and their sample position."""
    with tarfile.open(tar) as archive:
        names = [name for name in archive.getnames() if name.endswith(".jpg")]
    return {name: position for position, name in enumerate(names)}


# --- images --------------------------------------------------------------------------------


def _path_chain(con: duckdb.DuckDBPyConnection, layout: DataLayout, path: str) -> Chain:
    stored = _stored(layout, path)
    for row in _images(con, "mini_images", "path", stored, None):
        return _mini_chain(con, row)
    for row in _images(con, "tiles", "path", stored, None):
        return _tile_chain(con, row)
    raise LineageError(f"no kept image or Mini image with path {stored!r} in the manifest")


def _stored(layout: DataLayout, path: str) -> str:
    """A path as the manifest stores it: relative to the data folder."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        try:
            return candidate.relative_to(layout.root).as_posix()
        except ValueError:
            try:
                return layout.relative(candidate)
            except (ValueError, OSError):
                return candidate.as_posix()
    return candidate.as_posix().removeprefix("./")


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    return con.sql(sql, params=params).pl().to_dicts()


def _images(
    con: duckdb.DuckDBPyConnection, table: str, column: str, value: str, subdataset: str | None
) -> list[dict[str, Any]]:
    """Kept images of `table` (`tiles`: full CPIA, `mini_images`: Mini) whose `column`
    (image_name or path) is `value`, in `subdataset` or any."""
    return _rows(
        con,
        f"SELECT * FROM {table} WHERE {column} = ? AND path IS NOT NULL "
        "AND (?::VARCHAR IS NULL OR subdataset = ?) ORDER BY subdataset, scale",
        [value, subdataset, subdataset],
    )


def _mini_chain(con: duckdb.DuckDBPyConnection, row: Mapping[str, Any]) -> Chain:
    step = Step("Mini image", "cpia_mini", row["path"], None, row.get("run_id"),
                row.get("code_version"), _details(row, (
                    "image_name", "scale", "size_px", "source_size_px", "x", "y", "resample",
                    "parent_image", "label", "split", "bytes", "phash")))  # fmt: skip
    source = _images(con, "tiles", "image_name", row["source_tile"], row["subdataset"])
    if not source:
        raise LineageError(
            f"Mini image {row['path']}: its source tile {row['source_tile']!r} "
            f"({row['source_path']}) is not in the manifest's kept images"
        )
    return [step, *_tile_chain(con, source[0])]


def _tile_chain(con: duckdb.DuckDBPyConnection, row: Mapping[str, Any]) -> Chain:
    chain = [_tile_step(row)]
    parent = row
    while parent.get("parent_image"):  # S -> M -> XL, L/M -> XL
        found = _images(con, "tiles", "image_name", parent["parent_image"], row["subdataset"])
        if not found:
            chain.append(Step(f"parent {parent['parent_image']}", "scale_tiles", None,
                              details={"note": "not in the manifest's kept images"}))  # fmt: skip
            break
        parent = found[0]
        chain.append(_tile_step(parent))
    chain += list(_source_steps(con, row))
    return chain


def _tile_step(row: Mapping[str, Any]) -> Step:
    if row["kind"] == "roi":
        name, asset = f"ROI image ({row['scale']})", "standardized_wsi"
        details = _details(row, ("image_name", "scale", "size_px", "label", "split", "upscaled",
                                 "bytes", "phash", "in_mini", "mini_reason"))  # fmt: skip
    else:
        name, asset = f"{row['scale']} tile", "scale_tiles"
        size = row["size_px"]
        details = _details(row, ("image_name", "scale", "size_px")) | {
            "grid": f"({row['x']}, {row['y']})",
            "pixels": f"({size * row['x']}, {size * row['y']}) of the standardized slide",
        } | _details(row, ("cut_from", "tissue_fraction", "bytes", "phash", "in_mini",
                           "mini_reason"))  # fmt: skip
    return Step(name, asset, row["path"], None, row.get("run_id"), row.get("code_version"),
                details)  # fmt: skip


def _source_steps(con: duckdb.DuckDBPyConnection, tile: Mapping[str, Any]) -> Iterator[Step]:
    key = tile["subdataset"]
    source_file, sha256 = tile.get("source_file"), tile.get("source_sha256")
    if tile["kind"] == "wsi":
        slides = _rows(con, "SELECT * FROM slides WHERE subdataset = ? AND standardized_file = ?",
                       [key, tile["standardized_file"]])  # fmt: skip
        slide = slides[0] if slides else {}
        details = {"size": f"{slide['std_width']}x{slide['std_height']} px",
                   "mpp": slide["target_mpp"]} if slide else {"note": "no slides row"}  # fmt: skip
        details |= _details(slide, ("mpp_x", "mpp_origin", "vendor", "level", "scale_factor"))
        yield Step("standardized slide", "standardized_wsi", tile["standardized_file"], None,
                   slide.get("run_id"), slide.get("code_version"), details)  # fmt: skip
        source_file = slide.get("source_file") or source_file
        sha256 = slide.get("source_sha256") or sha256
    raw = _rows(
        con,
        "SELECT r.* FROM raw_files r JOIN subdatasets d ON d.key = r.subdataset "
        "WHERE r.subdataset = ? AND d.raw_dir || '/' || r.rel_path = ?",
        [key, source_file],
    )
    record = raw[0] if raw else {}
    details = _details(record, ("bytes", "source", "fetched_at"))
    if not record:
        details["note"] = "no raw_files row (not fetched by raw_download, or unpacked)"
    yield Step("source file", "raw_download", source_file, record.get("sha256") or sha256,
               record.get("run_id"), record.get("code_version"), details)  # fmt: skip
    entry = _rows(con, "SELECT * FROM subdatasets WHERE key = ?", [key])
    about = _details(entry[0], ("name", "kind", "organ", "table_i_row", "licence",
                                "redistributable", "landing_page")) if entry else {}  # fmt: skip
    yield Step("sub-dataset", "catalog", key, details=about)


def _details(row: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: row[name] for name in names if row.get(name) is not None}


# --- output ----------------------------------------------------------------------------------


def chains_json(query: str, chains: list[Chain]) -> dict[str, Any]:
    return {"query": query, "chains": [[_plain(step) for step in chain] for chain in chains]}


def _plain(step: Step) -> dict[str, Any]:
    return {
        "step": step.step, "asset": step.asset, "item": step.item, "sha256": step.sha256,
        "run_id": step.run_id, "code_version": step.code_version,
        "details": {name: str(value) if not isinstance(value, int | float | bool | str)
                    else value for name, value in step.details.items()},
    }  # fmt: skip


def chains_text(chains: list[Chain]) -> str:
    """Each chain as lines: the step and its file, then its facts (checksum first) wrapped."""
    blocks = []
    for chain in chains:
        lines = []
        for step in chain:
            lines.append(f"{step.step:<19} {step.item if step.item is not None else '-'}")
            facts = (
                {"sha256": step.sha256}
                | step.details
                | {"asset": step.asset, "run": step.run_id, "code_version": step.code_version}
            )
            text = "; ".join(f"{name}: {_fact(value)}" for name, value in facts.items()
                             if value is not None)  # fmt: skip
            lines += textwrap.wrap(text, 100, initial_indent=" " * 20,
                                   subsequent_indent=" " * 20, break_long_words=False,
                                   break_on_hyphens=False)  # fmt: skip
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _fact(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def chains_frame(chains: list[Chain]) -> pl.DataFrame:
    """One row per step (for --markdown): step, asset, item, sha256, run_id, code_version."""
    rows = [
        (step.step, step.asset, step.item, step.sha256, step.run_id, step.code_version)
        for chain in chains
        for step in chain
    ]
    columns = ("step", "asset", "item", "sha256", "run_id", "code_version")
    return pl.DataFrame(rows, schema=dict.fromkeys(columns, pl.String), orient="row")
