"""`cpia` / `python -m cpia_assets`: query the manifest (Table I, images, lineage, failures,
built vs published counts), print Table II from the evaluation's results, and plan a build
(`plan`: images, disk and hours per sub-dataset, before anything is downloaded).

Reads `manifest.duckdb` under --data-dir (default: $CPIA_DATA_DIR or ./data) read-only and
prints Polars frames; `tiles --output FILE` writes the selection as Parquet or CSV instead
(atomically; an existing file only with --force, never the manifest's own files). Errors are
one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import duckdb
import polars as pl

from cpia_assets.core.catalog.fields import CatalogError
from cpia_assets.core.catalog.loading import load_catalog
from cpia_assets.core.fsutil import atomic_path
from cpia_assets.core.layout import DataLayout, default_data_dir
from cpia_assets.core.manifest.database import ManifestError, open_manifest
from cpia_assets.core.manifest.paper_table_i import beside_paper
from cpia_assets.core.manifest.queries import (
    GROUP_COLUMNS,
    TileFilter,
    built_vs_published,
    count_tiles,
    failures,
    markdown_table,
    query_tiles,
    subdataset_info,
    table_i,
)
from cpia_assets.core.perceptual import NEAR_DUPLICATE_BITS
from cpia_assets.core.training import lineage as lineage_core
from cpia_assets.core.training.plan import plan_catalog, plan_text
from cpia_assets.core.training.ssl.table import table_ii_markdown

TILE_SUMMARY_COLUMNS = ("subdataset", "organ", "image_name", "kind", "scale", "size_px", "label",
                        "split", "in_mini", "path")  # fmt: skip
"""What `tiles` prints unless --all-columns; --output files always hold every column."""


EXPORT_FORMATS = {".parquet": pl.DataFrame.write_parquet, ".csv": pl.DataFrame.write_csv}
"""`tiles --output` formats, chosen by the file's suffix."""

NO_GROUPS = "none"
"""`count --by none`: a single total."""

MANIFEST_WAIT_S = 60.0
"""How long `lineage` waits for tile_manifest (the one writer) to let go of the database."""


class CliError(Exception):
    """A request the CLI refuses; the message names the file or argument and the reason."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    layout = DataLayout(Path(args.data_dir).resolve() if args.data_dir else default_data_dir())
    if args.command in _TEXT_COMMANDS:  # they print text of their own, not one frame
        try:
            print(args.command(layout, args))
        except (CliError, ManifestError, lineage_core.LineageError, CatalogError, OSError,
                ValueError) as exc:  # fmt: skip
            print(f"cpia: {_message(exc)}", file=sys.stderr)
            return 2
        except duckdb.Error as exc:
            print(f"cpia: {layout.duckdb_path}: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        export = None if args.output is None else _export_path(args.output, layout, args.force)
        with open_manifest(layout) as con:
            frame = args.command(con, args)
        if export is not None:
            with atomic_path(export) as tmp:
                EXPORT_FORMATS[export.suffix](frame, tmp)
            print(f"{frame.height} images written to {export}")
            return 0
    except (CliError, ManifestError, OSError) as exc:  # OSError: e.g. a full disk on --output
        print(f"cpia: {exc}", file=sys.stderr)
        return 2
    except duckdb.Error as exc:  # e.g. a table missing from a damaged manifest
        print(f"cpia: {layout.duckdb_path}: {exc}", file=sys.stderr)
        return 2
    if args.markdown:
        print(markdown_table(frame))
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=120, tbl_width_chars=240):
            print(frame)
    return 0


def _export_path(output: str, layout: DataLayout, force: bool) -> Path:
    """Where `tiles --output` may write: checked before the manifest is even opened."""
    path = Path(output).expanduser().absolute()
    if path.suffix not in EXPORT_FORMATS:
        raise CliError(f"--output {output}: the name must end in {' or '.join(EXPORT_FORMATS)}")
    if not path.parent.is_dir():
        raise CliError(f"--output {output}: folder {path.parent} does not exist")
    resolved = path.resolve()  # through links too
    if resolved == layout.duckdb_path.resolve() or resolved.is_relative_to(
        layout.manifests_dir.resolve()
    ):
        raise CliError(f"--output {output}: that is the manifest's own data; choose another file")
    if path.is_dir():
        raise CliError(f"--output {output}: is a folder")
    if path.exists() and not force:
        raise CliError(f"--output {output}: the file exists; add --force to replace it")
    return path


def _table1(con: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> pl.DataFrame:
    built = table_i(con, mini_only=args.mini)
    return beside_paper(built) if args.paper else built


def _message(exc: Exception) -> str:
    """KeyError-like exceptions quote their message; print it as written."""
    return str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)


def _table2(layout: DataLayout, args: argparse.Namespace) -> str:
    """Table II from downstream_eval's results (`ssl/eval/<task>/*.json`), labelled."""
    rows = [json.loads(path.read_text()) for path in sorted(layout.ssl_eval_dir.glob("*/*.json"))]
    if not rows:
        raise CliError(f"{layout.ssl_eval_dir}: no evaluation results; materialize downstream_eval")
    return table_ii_markdown(rows, NEAR_DUPLICATE_BITS)


def _compare(con: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> pl.DataFrame:
    if args.table_i:
        return beside_paper(table_i(con))
    return built_vs_published(con, built_only=args.built_only)


def _tile_filter(args: argparse.Namespace) -> TileFilter:
    return TileFilter(
        subdatasets=tuple(args.subdataset),
        scales=tuple(args.scale),
        kinds=tuple(args.kind),
        splits=tuple(args.split),
        labels=tuple(args.label),
        organs=tuple(args.organ),
        mini_only=args.mini,
    )


def _tiles(con: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> pl.DataFrame:
    """The matches: every row and column for --output, else --limit rows of the summary."""
    export = args.output is not None
    frame = query_tiles(con, _tile_filter(args), limit=None if export else args.limit)
    return frame if export or args.all_columns else frame.select(TILE_SUMMARY_COLUMNS)


def _count(con: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> pl.DataFrame:
    if NO_GROUPS in args.by and len(args.by) > 1:
        raise CliError(f"--by {NO_GROUPS} (a single total) cannot be combined with other columns")
    return count_tiles(con, _tile_filter(args), by=[name for name in args.by if name != NO_GROUPS])


def _lineage(layout: DataLayout, args: argparse.Namespace) -> str:
    """The chain from a shard sample, Mini image or image back to its raw file."""

    def waiting(message: str) -> None:
        print(f"cpia: {message} (tile_manifest is writing it)", file=sys.stderr)

    with open_manifest(layout, wait_s=MANIFEST_WAIT_S, on_wait=waiting) as con:
        chains = lineage_core.trace(con, layout, args.image, export=args.export,
                                    subdataset=args.subdataset, mini=args.mini)  # fmt: skip
    if args.json:
        return json.dumps(lineage_core.chains_json(args.image, chains), indent=1, default=str)
    if args.markdown:
        return markdown_table(lineage_core.chains_frame(chains))
    return lineage_core.chains_text(chains)


def _plan(layout: DataLayout, args: argparse.Namespace) -> str:
    """Images, disk and hours per sub-dataset of the selected catalog, and in total."""
    catalog = load_catalog(args.catalog or os.environ.get("CPIA_CATALOG"))
    rate, source = args.throughput, "given (--throughput)"
    if args.measure:
        from cpia_assets.core.wsi.measure import measure_tiling  # starts worker processes

        found = measure_tiling(workers=args.workers)
        rate, source = found.xl_per_second, found.describe()
    plan = plan_catalog(catalog, xl_per_second=rate,
                        throughput_source=source if rate is not None else "none given")  # fmt: skip
    if args.json:
        return json.dumps({"catalog": str(catalog.path), **plan.to_json()}, indent=1)
    return plan_text(plan, catalog, markdown=args.markdown)


def _failures(con: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> pl.DataFrame:
    return failures(con, subdatasets=args.subdataset, stages=args.stage)


def _datasets(con: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> pl.DataFrame:
    return subdataset_info(con, organs=args.organ, kinds=args.kind)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit code 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _non_negative_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()):  # no sign, no decimals
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cpia", description=__doc__)
    _add_common(parser, default=None)
    parser.set_defaults(output=None, force=False)  # only `tiles` exports
    # The same options after the command; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    table1 = commands.add_parser(
        "table1", parents=[common], help="image counts per organ, as the paper's Table I"
    )
    table1.add_argument("--mini", action="store_true", help="count CPIA-Mini images only")
    table1.add_argument(
        "--paper", action="store_true", help="each count beside the paper's Table I (v1) number"
    )
    table1.set_defaults(command=_table1)

    tiles = commands.add_parser(
        "tiles", parents=[common], help="list kept images matching the filters"
    )
    _add_filters(tiles)
    tiles.add_argument(
        "--limit", type=_non_negative_int, default=20, help="rows to print (default 20)"
    )
    tiles.add_argument(
        "--output", help="write every match, all columns, to a new FILE (.parquet or .csv)"
    )
    tiles.add_argument("--force", action="store_true", help="replace an existing --output file")
    tiles.add_argument("--all-columns", action="store_true", help="print every tile column")
    tiles.set_defaults(command=_tiles)

    count = commands.add_parser(
        "count", parents=[common], help="count kept images matching the filters"
    )
    _add_filters(count)
    count.add_argument(
        "--by", nargs="*", choices=[*sorted(GROUP_COLUMNS), NO_GROUPS],
        default=["subdataset", "scale"],
        help=f"group columns (default: subdataset scale; {NO_GROUPS} for a single total)",
    )  # fmt: skip
    count.set_defaults(command=_count)

    lineage = commands.add_parser(
        "lineage", parents=[common],
        help="trace a shard sample, Mini image or image back to its raw source file",
    )  # fmt: skip
    lineage.add_argument(
        "image",
        help="a shard sample key (wsi-x__L__SLIDE-960-1-2), an image path (cpia-mini/L/...) or "
        "an image name (TCGA-A2-A0EY-01A-01-BSA-960-39-6)",
    )  # fmt: skip
    lineage.add_argument("--export", help="the export the sample key is from, e.g. cpia-mini")
    lineage.add_argument("--subdataset", help="only in this sub-dataset (names may repeat)")
    lineage.add_argument("--mini", action="store_true", help="the name is a CPIA-Mini image's")
    lineage.add_argument("--json", action="store_true", help="print JSON")
    lineage.set_defaults(command=_lineage)

    plan = commands.add_parser(
        "plan", parents=[common],
        help="before downloading: images per scale, disk per output and tiling hours per "
        "sub-dataset of the catalog, and in total",
    )  # fmt: skip
    plan.add_argument("--catalog", help="cpia, demo or a file (default: $CPIA_CATALOG or cpia)")
    rate = plan.add_mutually_exclusive_group()
    rate.add_argument(
        "--throughput",
        type=_positive_float,
        help="tiling throughput in kept XL tiles per second (whole machine)",
    )
    rate.add_argument("--measure", action="store_true",
                      help="measure the throughput here first (the real tiling core on "
                      "synthetic slides of the shipped H&E crop, about a minute)")  # fmt: skip
    plan.add_argument("--workers", type=_positive_int, help="processes for --measure "
                      "(default: all cores)")  # fmt: skip
    plan.add_argument("--json", action="store_true", help="print JSON (bytes and hours exact)")
    plan.set_defaults(command=_plan)

    failed = commands.add_parser(
        "failures", parents=[common], help="input files skipped, with the reason"
    )
    failed.add_argument("--subdataset", action="append", default=[], help="repeatable")
    failed.add_argument("--stage", action="append", default=[], help="repeatable")
    failed.set_defaults(command=_failures)

    table2 = commands.add_parser(
        "table2", parents=[common],
        help="Table II from downstream_eval's results: test accuracy %% (macro F1 %%), test "
        "images and the leak audit per task, beside the paper's rows (markdown)",
    )  # fmt: skip
    table2.set_defaults(command=_table2)

    compare = commands.add_parser(
        "compare", parents=[common],
        help="images built per sub-dataset and scale vs the published per-set counts (the "
        "authors' later, larger release), or per organ vs the paper's Table I (--table-i)",
    )  # fmt: skip
    compare.add_argument(
        "--built-only", action="store_true", help="only sub-datasets with built images"
    )
    compare.add_argument(
        "--table-i", action="store_true",
        help="per Table I organ row: built counts beside the paper's v1 numbers",
    )  # fmt: skip
    compare.set_defaults(command=_compare)

    datasets = commands.add_parser(
        "datasets", parents=[common],
        help="the sub-datasets: organ, Table I row, licence (redistributable: false = no, "
        "empty = unknown), stain, diseases, histo/cytopathology, year, landing page, citation",
    )  # fmt: skip
    datasets.add_argument("--organ", action="append", default=[], help="e.g. lung (repeatable)")
    datasets.add_argument("--kind", action="append", default=[], choices=["wsi", "roi"])
    datasets.set_defaults(command=_datasets)
    return parser


_TEXT_COMMANDS = (_table2, _lineage, _plan)


def _add_common(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument(
        "--data-dir", default=default, help="data folder (default: $CPIA_DATA_DIR or ./data)"
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        default=False if default is None else default,
        help="print a markdown table instead of a frame",
    )


def _add_filters(parser: argparse.ArgumentParser) -> None:
    for name, example in (
        ("subdataset", "tcga-brca"),
        ("scale", "M"),
        ("kind", "wsi"),
        ("split", "train"),
        ("label", "tumour"),
        ("organ", "breast"),
    ):
        parser.add_argument(
            f"--{name}", action="append", default=[], help=f"e.g. {example} (repeatable)"
        )
    parser.add_argument("--mini", action="store_true", help="CPIA-Mini images only")
