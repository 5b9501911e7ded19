"""The building blocks of catalog entries: constants, strict field types and `Block`.

Every block of an entry is a typed, frozen pydantic model that refuses wrong types instead of
coercing them (`labelled: "no"` is an error, not true) and unknown fields with a did-you-mean
hint. Regular expressions are RE2 (linear time: no pattern or file name can hang a step).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache, lru_cache
from typing import Annotated, Any, Literal, get_args

import re2
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cpia_assets.core.catalog.sources import did_you_mean

Kind = Literal["wsi", "roi"]
Scale = Literal["XL", "L", "M", "S"]
RoiScale = Literal["L", "M", "S"]
KINDS: tuple[str, ...] = get_args(Kind)
ALL_SCALES: tuple[str, ...] = get_args(Scale)
ROI_SCALES: tuple[str, ...] = get_args(RoiScale)
SPLITS = ("train", "val", "test", "none")
RULE_SPLITS = SPLITS[:-1]
"""Split values a label-or-split rule may yield; 'none' is for entries without a split rule."""
KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")
"""Partition keys, matched in full (so a trailing newline is refused too)."""

TABLE_I_ORGANS = (
    "adrenal gland", "bladder", "blood", "bone", "bone marrow", "brain", "breast",
    "canine cutaneous", "cervix uteri", "colon", "colorectum", "connective tissue",
    "eye and adnexa", "head and neck", "kidney", "liver", "lung", "lymph", "oral cavity", "ovary",
    "pancreas", "prostate", "skin", "stomach", "testis", "thyroid", "uterus", "multiple organs",
)  # fmt: skip
"""The organ rows of the paper's Table I, in its order."""


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file, the entry and the field."""


# ---------------------------------------------------------------------------------------------
# Regular expressions

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error is reported with the catalog entry instead


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re2._Regexp:
    """A catalog regular expression compiled with RE2; raises re2.error if RE2 cannot run it.

    RE2 matches in time linear in the name, so a crafted pattern such as `(a+)+$` cannot hang a
    step; the price is no backreferences and no lookaround.
    """
    return re2.compile(pattern, _RE2_OPTIONS)


@lru_cache(maxsize=4096)
def group_names(pattern: str) -> frozenset[str]:
    return frozenset(compile_pattern(pattern).groupindex)


def _check_pattern(pattern: str) -> str:
    try:
        compile_pattern(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PydanticCustomError(
            "catalog_pattern",
            "{pattern} is not a supported regular expression ({reason}); catalog patterns use "
            "RE2 syntax, without backreferences or lookaround",
            {"pattern": repr(pattern), "reason": reason},
        ) from None
    return pattern


# ---------------------------------------------------------------------------------------------
# Field types: strict scalars, so YAML's guesses never turn into silent misreadings


def _text_from_scalar(value: Any) -> Any:
    """Names and map entries: YAML reads folder names like `0` as numbers (kept, as text) and
    unquoted yes/no/on/off as booleans (refused: quote them)."""
    if isinstance(value, bool):
        raise PydanticCustomError(
            "catalog_yaml_boolean",
            "YAML reads this unquoted word as the boolean {value}; quote it to mean the text",
            {"value": str(value).lower()},
        )
    return str(value) if isinstance(value, int) else value


def _check_key(key: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise PydanticCustomError(
            "catalog_key", "{key} must be lower-case letters, digits and '-'", {"key": repr(key)}
        )
    return key


Text = Annotated[StrictStr, Field(min_length=1)]
Name = Annotated[StrictStr, BeforeValidator(_text_from_scalar), Field(min_length=1)]
Key = Annotated[StrictStr, AfterValidator(_check_key)]
Pattern = Annotated[StrictStr, AfterValidator(_check_pattern)]
PositiveNumber = Annotated[float, Strict(), Field(gt=0)]
Count = Annotated[StrictInt, Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]


class Block(BaseModel):
    """A block of a catalog entry: frozen, typed, and closed (unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            known = _field_names(cls)
            unknown = [name for name in data if name not in known]
            if unknown:
                raise PydanticCustomError(
                    "catalog_unknown_fields",
                    "unknown field(s) {names}",
                    {"names": unknown, "hints": [did_you_mean(name, known) for name in unknown]},
                )
        return data


@cache
def _field_names(block: type[Block]) -> list[str]:
    """The names a block's fields have in YAML (checked for every block of every entry)."""
    return [field.alias or name for name, field in block.model_fields.items()]
