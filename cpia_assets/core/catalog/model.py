"""The sub-dataset catalog: one `SubDataset` per CPIA source dataset, one Dagster partition
each, and the `Catalog` that holds them. A catalog is a YAML file with a top-level
`subdatasets:` list (README "Catalog format"), loaded by `core/catalog/loading.py`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cpia_assets.core.catalog.fields import (
    ALL_SCALES,
    ROI_SCALES,
    TABLE_I_ORGANS,
    Block,
    Count,
    Fraction,
    Key,
    Kind,
    Name,
    PositiveNumber,
    RoiScale,
    Scale,
    Text,
    compile_pattern,
)
from cpia_assets.core.catalog.rules import LabelRule, ScaleRule, SplitRule, check_split_values


class WsiOptions(Block):
    """How slides of one WSI sub-dataset are opened and how their resolution is found."""

    mpp_overrides: dict[Name, PositiveNumber] = Field(default_factory=dict)  # by name or stem
    use_objective_power: StrictBool = False  # opt in: MPP = 10 / objective power, an estimate
    allow_plain_images: StrictBool = False  # opt in: read flat TIFF/PNG/JPEG through pyvips
    patterns: tuple[Text, ...] = ()  # glob patterns selecting slide files; empty = by extension


class Crop(Block):
    """ROI crop: the centred square of `fraction` of the image's short side."""

    fraction: Annotated[float, Strict(), Field(gt=0, le=1)]


class TissueOverrides(Block):
    """Per-sub-dataset changes to scale_tiles' tissue thresholds (`core/wsi/tissue.py`), e.g. a
    lower saturation for pale stains; a field left out keeps the run config's value."""

    saturation: Fraction | None = None
    min_brightness: Annotated[StrictInt, Field(ge=0, le=255)] | None = None
    thumbnail_min_tissue: Fraction | None = None
    xl_min_tissue: Fraction | None = None
    tile_min_tissue: Fraction | None = None

    def values(self) -> dict[str, float]:
        """The thresholds this entry sets."""
        return self.model_dump(exclude_none=True)


UNKNOWN = "unknown"


def _check_year(value: Any) -> Any:
    if value == UNKNOWN or (type(value) is int and 1900 <= value <= 2100):
        return value
    raise PydanticCustomError(
        "catalog_year",
        "should be a year such as 2019, or 'unknown' (got {value})",
        {"value": repr(value)},
    )


class About(Block):
    """What users ask about a sub-dataset, from its source's own page; "unknown" where a fact
    could not be confirmed."""

    licence: Text = UNKNOWN
    redistributable: StrictBool | None = None
    """Whether the licence allows sharing copies (under its conditions); null: unknown."""
    stain: Text = UNKNOWN
    diseases: tuple[Text, ...] = ()
    pathology: Literal["histopathology", "cytopathology", "unknown"] = UNKNOWN
    year: Annotated[int | str, BeforeValidator(_check_year)] = UNKNOWN
    landing_page: Text = UNKNOWN
    citation: Text = UNKNOWN


def _check_table_i_row(row: str) -> str:
    if row not in TABLE_I_ORGANS:
        close = difflib.get_close_matches(row, TABLE_I_ORGANS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PydanticCustomError(
            "catalog_table_i_row",
            "{row} is not an organ row of the paper's Table I{hint}",
            {"row": repr(row), "hint": hint},
        )
    return row


_ROI_ONLY_FIELDS = ("scale", "scale_rules", "labels", "splits", "crop")
_WSI_ONLY_FIELDS = ("wsi", "tissue_thresholds")


class SubDataset(Block):
    """One catalog entry, one partition.

    `load_catalog` also checks `source` (`sources.validate_source`) and resolves a local source's
    relative path against the catalog file's folder; entries built in code skip that step.

    `organ` is the sub-dataset's real organ (for users who filter by organ); `table_i_row` is the
    paper's Table I row it is counted under when that differs (SIPaKMeD, cervical cytology, is
    counted under bone marrow), and the Table I report uses it (`table_i_organ`).
    """

    key: Key
    name: Text
    kind: Kind
    organ: Text
    source: dict[str, Any]
    labelled: StrictBool = False
    scale: RoiScale | None = None
    scale_rules: tuple[ScaleRule, ...] = ()
    labels: LabelRule | None = None
    splits: Annotated[SplitRule, AfterValidator(check_split_values)] | None = None
    crop: Crop | None = None
    wsi: WsiOptions = Field(default_factory=WsiOptions)
    tissue_thresholds: TissueOverrides = Field(default_factory=TissueOverrides)
    table_i_row: Annotated[StrictStr, AfterValidator(_check_table_i_row)] | None = None
    published_counts: dict[Scale, Count] = Field(default_factory=dict)
    about: About = Field(default_factory=About)
    description: StrictStr = ""

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> SubDataset:
        if self.kind == "wsi":
            misplaced = [name for name in _ROI_ONLY_FIELDS if name in self.model_fields_set]
            kind_needed = "ROI"
        else:
            misplaced = [name for name in _WSI_ONLY_FIELDS if name in self.model_fields_set]
            kind_needed = "WSI"
        if misplaced:
            raise PydanticCustomError(
                "catalog_kind",
                "applies to {kind} sub-datasets only",
                {"field": misplaced[0], "kind": kind_needed},
            )
        if self.kind == "roi" and self.scale is None and not self.scale_rules:
            raise PydanticCustomError(
                "catalog_roi_scale",
                "ROI sub-datasets need 'scale' or 'scale_rules'",
                {"field": "scale"},
            )
        return self

    @property
    def table_i_organ(self) -> str:
        """The Table I row this sub-dataset is counted under."""
        return self.table_i_row or self.organ

    @property
    def redistributable(self) -> bool | None:
        """Whether its licence allows sharing copies (None: unknown); exports flag the rest."""
        return self.about.redistributable

    @property
    def scales(self) -> tuple[str, ...]:
        """Scales this sub-dataset contributes images to."""
        if self.kind == "wsi":
            return ALL_SCALES
        found = {rule.scale for rule in self.scale_rules}
        if self.scale:
            found.add(self.scale)
        return tuple(s for s in ROI_SCALES if s in found)

    def scale_for(self, relative_path: str) -> str | None:
        """The ROI scale of one source image: first matching rule, else `scale` (None = skip)."""
        for rule in self.scale_rules:
            if compile_pattern(rule.pattern).search(relative_path):
                return rule.scale
        return self.scale


@dataclass(frozen=True)
class Catalog:
    path: Path
    subdatasets: tuple[SubDataset, ...]

    @property
    def keys(self) -> list[str]:
        return [entry.key for entry in self.subdatasets]

    @cached_property
    def _by_key(self) -> dict[str, SubDataset]:
        return {entry.key: entry for entry in self.subdatasets}

    def get(self, key: str) -> SubDataset:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"sub-dataset {key!r} is not in catalog {self.path}") from None
