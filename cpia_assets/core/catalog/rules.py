"""The rules of a ROI entry: which scale an image goes to, and its label and split.

Each rule is a block of the entry (`scale_rules`, `labels`, `splits`); `core/catalog/labels.py`
applies them to the images of one source folder.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError

from cpia_assets.core.catalog.fields import (
    RULE_SPLITS,
    Block,
    Count,
    Name,
    Pattern,
    RoiScale,
    Text,
    group_names,
)
from cpia_assets.core.catalog.splits import DEFAULT_RATIOS, STRATIFIED


class ScaleRule(Block):
    """Images whose path (relative to the source folder) matches `pattern` go to `scale`."""

    pattern: Pattern
    scale: RoiScale


class _Rule(Block):
    """A `labels` or `splits` rule: gives each ROI image a value from its relative path.

    `map` translates the rule's raw values (`{Training: train}`); `default` stands in where the
    rule finds no value (otherwise the image is a failure). `labels.py` applies each rule.
    """

    map: dict[Name, Name] = Field(default_factory=dict)
    default: Name | None = None


class ParentFolderRule(_Rule):
    """The name of the image's folder at `level` (1 = its parent, 2 = the grandparent, ...)."""

    from_: Literal["parent_folder"] = Field(alias="from")
    level: Annotated[StrictInt, Field(ge=1)] = 1


class RegexRule(_Rule):
    """The `value` group of the first match of `pattern` in the relative path."""

    from_: Literal["regex"] = Field(alias="from")
    pattern: Pattern

    @model_validator(mode="after")
    def _has_value_group(self) -> RegexRule:
        if "value" not in group_names(self.pattern):
            raise PydanticCustomError(
                "catalog_value_group",
                "{pattern} needs a (?P<value>...) group",
                {"field": "pattern", "pattern": repr(self.pattern)},
            )
        return self


def _as_list(value: Any) -> Any:
    """One table file given as text stands for a list of one."""
    return [value] if isinstance(value, str) else value


class _TableRule(_Rule):
    """A rule that looks images up in label tables (CSV, or the first sheet of an .xlsx) in the
    source folder, by the image's relative path, file name or stem in `image_column`.

    `normalise_names` compares names with case ignored and every run of spaces, hyphens and
    underscores read as one '-' (a table listing "Case 3 - A16" for the file Case-3-A16.jpg).
    `keep_unlisted` keeps images no table lists, without a value (no label, split 'none'),
    where a table labels only part of a set; otherwise such an image is a failure.
    """

    image_column: Text
    delimiter: Annotated[StrictStr, Field(min_length=1, max_length=1)] = ","  # CSV only
    normalise_names: StrictBool = False
    keep_unlisted: StrictBool = False


class CsvRule(_TableRule):
    """The `column` value of the row naming the image in table `file` (or in any of a list of
    tables); with `one_hot` instead of `column`, the name of the one listed column whose cell
    is 1 (labels stored as one-hot columns)."""

    from_: Literal["csv"] = Field(alias="from")
    file: Annotated[tuple[Text, ...], BeforeValidator(_as_list), Field(min_length=1)]
    column: Text | None = None
    one_hot: tuple[Text, ...] = ()

    @model_validator(mode="after")
    def _one_value_source(self) -> CsvRule:
        if (self.column is None) == (not self.one_hot):
            raise PydanticCustomError(
                "catalog_csv_value",
                "give either 'column' or 'one_hot'",
                {"field": "column"},
            )
        return self

    @property
    def tables(self) -> tuple[str, ...]:
        """The table files this rule reads, relative to the source folder."""
        return self.file


class ListedRule(_TableRule):
    """The value `files` gives the table that lists the image (`{Train.xlsx: train}`): for
    sources whose split is which table names an image."""

    from_: Literal["listed"] = Field(alias="from")
    files: Annotated[dict[Text, Name], Field(min_length=1)]

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(self.files)


class StratifiedSplit(Block):
    """The declared seeded stratified split (`core/catalog/splits.py`), for labelled sets without an
    official split: each label's images are cut train:val:test by `ratios` (default 7:1:2, as
    the paper splits pRCC and CAM16) in an order seeded by `seed`."""

    from_: Literal["stratified"] = Field(alias="from")
    ratios: dict[Literal["train", "val", "test"], Count] = Field(
        default_factory=lambda: dict(DEFAULT_RATIOS)
    )
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _some_ratio(self) -> StratifiedSplit:
        if not any(self.ratios.values()):
            raise PydanticCustomError(
                "catalog_ratios", "needs at least one non-zero ratio", {"field": "ratios"}
            )
        return self


class ConstantLabel(Block):
    """One label for every image of a single-class set (e.g. the smears of one malaria species)."""

    from_: Literal["constant"] = Field(alias="from")
    value: Name


Rule = Annotated[ParentFolderRule | RegexRule | CsvRule | ListedRule, Field(discriminator="from_")]
LabelRule = Annotated[
    ParentFolderRule | RegexRule | CsvRule | ListedRule | ConstantLabel,
    Field(discriminator="from_"),
]
SplitRule = Annotated[
    ParentFolderRule | RegexRule | CsvRule | ListedRule | StratifiedSplit,
    Field(discriminator="from_"),
]
RULE_SOURCES = ("parent_folder", "regex", "csv", "listed")
RULE_TYPES = (*RULE_SOURCES, "constant", STRATIFIED)
"""Every `from` of a labels or splits rule (pydantic names the type in error locations)."""


def check_split_values(rule: _Rule | StratifiedSplit) -> _Rule | StratifiedSplit:
    if isinstance(rule, StratifiedSplit):
        return rule
    given = rule.files.values() if isinstance(rule, ListedRule) else ()
    given = [value for value in given if value not in rule.map]
    bad = sorted({*rule.map.values(), *given, rule.default} - {*RULE_SPLITS, None})
    if bad:
        raise PydanticCustomError(
            "catalog_split_values",
            "the splits rule maps to {bad}; values must be one of {allowed}",
            {"bad": bad, "allowed": RULE_SPLITS},
        )
    return rule
