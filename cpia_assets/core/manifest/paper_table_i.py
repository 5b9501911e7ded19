"""The paper's Table I (CPIA v1, arXiv 2310.17902): images per organ row in its seven columns.

Kept with the code so every Table I report can show the paper's numbers beside the built ones.
The per-sub-dataset `published_counts` of the catalog come from the authors' later, larger
release (repository spreadsheets, 148,962,586 images; its WSI counts are about five times
these), not from this table.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from cpia_assets.core.manifest.tables import TABLE_I_COLUMNS

PAPER_SUFFIX = " (paper v1)"
TABLE_I_NOTE = (
    "Columns marked (paper v1) are the paper's Table I (arXiv 2310.17902, 21,427,877 images). "
    "The per-sub-dataset published counts (built vs published) come from the authors' later, "
    "larger release (148,962,586 images)."
)
COUNT_COLUMNS = ("sub-datasets", *(column for column, _, _ in TABLE_I_COLUMNS), "total")

# organ: sub-datasets, WSIs-XL, WSIs-L, ROIs-L, WSIs-M, ROIs-M, WSIs-S, ROIs-S
PAPER_TABLE_I: Mapping[str, tuple[int, ...]] = {
    "adrenal gland": (1, 358, 5_559, 0, 10_961, 0, 10_740, 0),
    "bladder": (1, 397, 6_046, 0, 11_823, 0, 11_507, 0),
    "blood": (8, 0, 0, 0, 0, 0, 0, 51_604),
    "bone": (1, 0, 0, 1_144, 0, 0, 0, 0),
    "bone marrow": (2, 902, 3_665, 0, 23_200, 0, 18_787, 1_004),
    "brain": (2, 1_596, 20_760, 0, 40_944, 0, 39_276, 0),  # printed "Brian"
    "breast": (13, 3_884, 50_073, 279_861, 207_970, 10_105, 191_749, 0),
    "canine cutaneous": (1, 1_000, 15_185, 0, 29_818, 0, 28_791, 0),
    "cervix uteri": (1, 844, 12_739, 0, 24_783, 0, 24_111, 0),
    "colon": (5, 5_507, 46_427, 0, 257_978, 16_398, 219_559, 0),
    "colorectum": (10, 115, 1_783, 3_540, 3_525, 142_939, 3_464, 0),
    "connective tissue": (1, 4_034, 48_856, 0, 302_175, 0, 288_907, 0),
    "eye and adnexa": (1, 474, 7_187, 0, 14_131, 0, 13_941, 0),
    "head and neck": (1, 6_036, 73_071, 0, 450_970, 0, 432_351, 0),
    "kidney": (5, 15_683, 212_967, 0, 1_126_696, 1_419, 1_079_566, 0),
    "liver": (1, 5_696, 83_922, 0, 520_918, 0, 509_939, 0),
    "lung": (5, 51_790, 683_060, 0, 4_231_568, 25_171, 4_026_259, 0),
    "lymph": (4, 3_492, 37_928, 374, 214_733, 220_025, 203_841, 0),
    "oral cavity": (1, 952, 14_748, 0, 28_965, 0, 28_277, 0),
    "ovary": (2, 3_031, 27_486, 0, 109_387, 0, 95_423, 0),
    "pancreas": (2, 5_536, 69_566, 0, 372_647, 0, 357_403, 0),
    "prostate": (3, 1_000, 15_592, 331, 30_440, 18_783, 29_168, 0),
    "skin": (3, 5_898, 68_467, 0, 396_103, 0, 377_725, 0),
    "stomach": (4, 876, 13_577, 1_770, 26_691, 224_364, 25_997, 146_651),
    "testis": (1, 869, 8_842, 0, 17_372, 0, 15_597, 0),
    "thyroid": (1, 855, 13_265, 0, 25_964, 0, 25_290, 0),
    "uterus": (3, 9_024, 108_317, 0, 650_964, 0, 611_392, 0),
    "multiple organs": (20, 10_137, 139_978, 521, 275_661, 12_992, 264_382, 0),
}
PAPER_TOTALS = (103, 139_986, 1_789_066, 287_541, 9_406_387, 672_196, 8_933_442, 199_259)
"""The table's printed total row; 21,427,877 images."""


def paper_frame() -> pl.DataFrame:
    """The paper's Table I with a Total row, in the columns of the built report."""
    rows = [(organ, *counts) for organ, counts in PAPER_TABLE_I.items()]
    rows.append(("Total", *PAPER_TOTALS))
    frame = pl.DataFrame(rows, schema=["organ", *COUNT_COLUMNS[:-1]], orient="row")
    images = [column for column, _, _ in TABLE_I_COLUMNS]
    return frame.with_columns(total=pl.sum_horizontal(images)).cast(
        dict.fromkeys(COUNT_COLUMNS, pl.Int64)
    )


def beside_paper(built: pl.DataFrame) -> pl.DataFrame:
    """A built Table I report (`manifest.table_i`) with the paper's number after each count
    column (`<column> (paper v1)`; null for organ rows the paper does not have)."""
    paper = paper_frame().rename({column: column + PAPER_SUFFIX for column in COUNT_COLUMNS})
    joined = built.join(paper, on="organ", how="left", maintain_order="left")
    ordered = [name for column in COUNT_COLUMNS for name in (column, column + PAPER_SUFFIX)]
    return joined.select("organ", *ordered)
