"""The sub-dataset catalog: one entry per CPIA source dataset, one Dagster partition each.

A catalog is a YAML file with a top-level `subdatasets:` list; see README "Catalog format". It is a
public interface, so it is validated strictly on load: every block of an entry is a typed, frozen
pydantic model (`_Block`) that refuses wrong types instead of coercing them (`labelled: "no"` is an
error, not true) and unknown fields with a did-you-mean hint; duplicate YAML keys are errors;
regular expressions are RE2 (linear time: no pattern or file name can hang a step). Every problem
reads "<file>: entry '<key>' (#n): field '<path>': <reason>", all of them at once.

A file is parsed once per process while it is unchanged (same modification time and size), so
definition loads and steps share one parse; treat the returned catalog as read-only. Across
processes (each run and step loads the definitions again), `load_catalog(..., cache_dir=)` keeps
the validated entries as JSON: parsing a 10,000-entry file with PyYAML takes seconds, reading
the JSON back through the same validation a fraction of that.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import re2
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cpia_assets.core.downloads import SourceSpecError, validate_source
from cpia_assets.core.downloads import spec as source_spec
from cpia_assets.core.downloads.spec import did_you_mean
from cpia_assets.core.fsutil import OutputWriteError, atomic_path
from cpia_assets.core.splits import DEFAULT_RATIOS, STRATIFIED

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
BUILTIN_CATALOGS = {"cpia": "cpia.yaml", "demo": "demo.yaml"}
MAX_REPORTED_PROBLEMS = 20

_log = logging.getLogger(__name__)

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
def _group_names(pattern: str) -> frozenset[str]:
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


class _Block(BaseModel):
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
def _field_names(block: type[_Block]) -> list[str]:
    """The names a block's fields have in YAML (checked for every block of every entry)."""
    return [field.alias or name for name, field in block.model_fields.items()]


# ---------------------------------------------------------------------------------------------
# The blocks of an entry


class ScaleRule(_Block):
    """Images whose path (relative to the source folder) matches `pattern` go to `scale`."""

    pattern: Pattern
    scale: RoiScale


class WsiOptions(_Block):
    """How slides of one WSI sub-dataset are opened and how their resolution is found."""

    mpp_overrides: dict[Name, PositiveNumber] = Field(default_factory=dict)  # by name or stem
    use_objective_power: StrictBool = False  # opt in: MPP = 10 / objective power, an estimate
    allow_plain_images: StrictBool = False  # opt in: read flat TIFF/PNG/JPEG through pyvips
    patterns: tuple[Text, ...] = ()  # glob patterns selecting slide files; empty = by extension


class Crop(_Block):
    """ROI crop: the centred square of `fraction` of the image's short side."""

    fraction: Annotated[float, Strict(), Field(gt=0, le=1)]


class _Rule(_Block):
    """A `labels` or `splits` rule: gives each ROI image a value from its relative path.

    `map` translates the rule's raw values (`{Training: train}`); `default` stands in where the
    rule finds no value (otherwise the image is a failure). See `core/labels.py` for how each
    rule is applied.
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
        if "value" not in _group_names(self.pattern):
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


class StratifiedSplit(_Block):
    """The declared seeded stratified split (`core/splits.py`), for labelled sets without an
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


class ConstantLabel(_Block):
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
_RULE_TYPES = (*RULE_SOURCES, "constant", STRATIFIED)
"""Every `from` of a labels or splits rule (pydantic names the type in error locations)."""


def _check_split_values(rule: _Rule | StratifiedSplit) -> _Rule | StratifiedSplit:
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


Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]


class TissueOverrides(_Block):
    """Per-sub-dataset changes to scale_tiles' tissue thresholds (`core/tissue.py`), e.g. a lower
    saturation for pale stains; a field left out keeps the run config's value."""

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


class About(_Block):
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


class SubDataset(_Block):
    """One catalog entry, one partition.

    `load_catalog` also checks `source` (`downloads.validate_source`) and resolves a local source's
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
    splits: Annotated[SplitRule, AfterValidator(_check_split_values)] | None = None
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


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_catalog_path(spec: str | Path | None) -> Path:
    """`demo`/`cpia` name a built-in catalog; anything else is a file path. Default: full CPIA."""
    spec = str(spec) if spec else "cpia"
    if spec in BUILTIN_CATALOGS:
        return Path(str(resources.files("cpia_assets") / "catalogs" / BUILTIN_CATALOGS[spec]))
    try:
        path = Path(spec).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise CatalogError(f"catalog file {spec}: cannot resolve the path: {exc}") from exc
    if not path.is_file():
        raise CatalogError(f"catalog file {path} does not exist (CPIA_CATALOG={spec!r})")
    return path


def load_catalog(spec: str | Path | None = None, *, cache_dir: Path | None = None) -> Catalog:
    """The validated catalog `spec` names (see `resolve_catalog_path`), parsed once per process.

    With `cache_dir`, the validated entries are also kept there for other processes (see
    `_CatalogCache`); a stale or unreadable cache is ignored and rewritten.
    """
    path = resolve_catalog_path(spec)
    try:
        stat = path.stat()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc.strerror}") from exc
    return _load(_FileVersion(path, stat.st_size, stat.st_mtime_ns), cache_dir)


@dataclass(frozen=True)
class _FileVersion:
    """One version of a catalog file: a changed file has another size or modification time."""

    path: Path
    size: int
    mtime_ns: int


@lru_cache(maxsize=16)
def _load(version: _FileVersion, cache_dir: Path | None) -> Catalog:
    cache = _CatalogCache(cache_dir, version) if cache_dir else None
    entries = cache.read() if cache else None
    if entries is None:
        entries = _validated_entries(version.path)
        if cache:
            cache.write(entries)
    return Catalog(path=version.path, subdatasets=_with_local_paths(entries, version.path))


def _validated_entries(path: Path) -> list[SubDataset]:
    """Parse and validate every entry of a catalog file; raises naming all problems at once."""
    entries: list[SubDataset] = []
    problems: list[str] = []
    first_of_key: dict[str, int] = {}
    for number, raw in enumerate(_read_entries(path), 1):
        where = _entry_label(raw, number)
        try:
            entry = _parse_entry(raw)
        except _EntryError as exc:
            problems += [f"{path}: {where}: {problem}" for problem in exc.problems]
            continue
        if entry.key in first_of_key:
            problems.append(
                f"{path}: {where}: field 'key': duplicate key {entry.key!r} "
                f"(entry #{first_of_key[entry.key]} has it too)"
            )
        first_of_key.setdefault(entry.key, number)
        entries.append(entry)
    _raise_problems(path, problems)
    return entries


def _with_local_paths(entries: list[SubDataset], path: Path) -> tuple[SubDataset, ...]:
    """Entries whose local source path is resolved against the catalog file's folder, so a
    catalog travels with its data. Done on every load: the links it follows may change."""
    resolved: list[SubDataset] = []
    problems: list[str] = []
    for number, entry in enumerate(entries, 1):
        if entry.source["type"] != "local":
            resolved.append(entry)
            continue
        given = entry.source["path"]
        try:
            local = str((path.parent / Path(given).expanduser()).resolve())
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            problems.append(
                f"{path}: entry {entry.key!r} (#{number}): field 'source.path': "
                f"cannot resolve {given!r}: {exc}"
            )
            continue
        resolved.append(entry.model_copy(update={"source": {**entry.source, "path": local}}))
    _raise_problems(path, problems)
    return tuple(resolved)


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"{path}: ... and {len(problems) - len(shown)} more problems")
        raise CatalogError("\n".join(shown))


_ENTRIES = TypeAdapter(list[SubDataset])


@lru_cache(maxsize=1)
def _code_version() -> str:
    """A hash of the code that decides what a valid entry is: a new version of it never reads
    a cache written by an older one."""
    digest = hashlib.sha256()
    for module_file in (__file__, source_spec.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _CatalogCache:
    """The validated entries of one catalog file version, as JSON in `folder`.

    The file is named after the catalog's path and records the version it was made from (size,
    modification time, code version); a cache of another version, or one that cannot be read, is
    ignored. Entries read back go through the same validation as the YAML's, so a damaged cache
    can never yield an invalid entry; only local paths are resolved after (`_with_local_paths`).
    """

    folder: Path
    version: _FileVersion

    @property
    def file(self) -> Path:
        name = hashlib.sha256(str(self.version.path).encode()).hexdigest()[:32]
        return self.folder / f"{name}.json"

    @property
    def stamp(self) -> dict[str, Any]:
        return {
            "path": str(self.version.path),
            "size": self.version.size,
            "mtime_ns": self.version.mtime_ns,
            "code": _code_version(),
        }

    def read(self) -> list[SubDataset] | None:
        try:
            stamp, entries = self.file.read_bytes().split(b"\n", 1)
            if json.loads(stamp) != self.stamp:
                return None
            return _ENTRIES.validate_json(entries)
        except (OSError, ValueError):  # missing, unreadable, or damaged (ValidationError too)
            return None

    def write(self, entries: list[SubDataset]) -> None:
        """Store `entries` atomically; entries JSON cannot represent exactly (YAML dates,
        infinities) are not cached, and a cache that cannot be written only costs speed."""
        data = _ENTRIES.dump_json(entries, by_alias=True, exclude_unset=True)
        try:
            if _ENTRIES.validate_json(data) != entries:
                return
        except ValidationError:
            return
        try:
            with atomic_path(self.file) as tmp:
                tmp.write_bytes(json.dumps(self.stamp).encode() + b"\n" + data)
        except (OSError, OutputWriteError) as exc:
            _log.warning("catalog cache %s not written: %s", self.file, exc)


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """Valid YAML, but a key given twice: YAML would silently keep the last value."""


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster


class _CatalogLoader(_SafeLoader):
    """The safe loader (libyaml's where PyYAML has it) refusing a key given twice in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merges may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # refused by the base class with its own message
            if key in first_seen:
                raise _DuplicateKeyError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first_seen[key].line + 1})",
                    key_node.start_mark,
                )
            first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_entries(path: Path) -> list[Any]:
    """The raw `subdatasets:` list of a catalog file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from exc
    try:
        document = yaml.load(text, Loader=_CatalogLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = (
            exc.problem if isinstance(exc, _DuplicateKeyError) else f"not valid YAML: {exc.problem}"
        )
        raise CatalogError(f"{path}: {where}{problem}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("subdatasets"), list):
        raise CatalogError(f"{path}: expected a top-level 'subdatasets:' list")
    unknown = [name for name in document if name != "subdatasets"]
    if unknown:
        raise CatalogError(
            f"{path}: unknown top-level field {unknown[0]!r}"
            f"{did_you_mean(unknown[0], ['subdatasets'])}"
        )
    if not document["subdatasets"]:
        raise CatalogError(f"{path}: the 'subdatasets:' list is empty")
    return document["subdatasets"]


class _EntryError(Exception):
    """The problems of one entry, each "field '<path>': <reason>"."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _entry_label(raw: Any, number: int) -> str:
    key = raw.get("key") if isinstance(raw, Mapping) else None
    return f"entry {key!r} (#{number})" if isinstance(key, str) else f"entry #{number}"


def _parse_entry(raw: Any) -> SubDataset:
    try:
        entry = SubDataset.model_validate(raw)
    except ValidationError as exc:
        raise _EntryError(list(_describe(exc))) from None
    try:
        source = validate_source(entry.source)
    except SourceSpecError as exc:
        raise _EntryError(
            [_problem(["source", *([field] if field else [])], why) for field, why in exc.problems]
        ) from None
    return entry.model_copy(update={"source": source})


_RULE_FIELDS = ("labels", "splits")
_PLAIN_REASONS = {
    "missing": "required field is missing",
    "tuple_type": "should be a list",
    "list_type": "should be a list",
    "dict_type": "should be a mapping",
    "model_type": "should be a mapping",
    "model_attributes_type": "should be a mapping",
    "string_type": "should be text",
}
"""Pydantic's wording where it names Python types instead of YAML ones."""


def _describe(error: ValidationError) -> Iterator[str]:
    """Pydantic's errors as "field '<path>': <reason>" lines, in the catalog's own words."""
    for item in error.errors(include_url=False):
        loc = item["loc"]
        if loc[-1:] == ("[key]",):  # a mapping key: named by the key itself (pydantic may not)
            loc = (*loc[:-2], f"{item['input']} (key)")
        location = _location(loc)
        context = item.get("ctx") or {}
        kind = item["type"]
        if kind == "catalog_unknown_fields":
            for name, hint in zip(context["names"], context["hints"], strict=True):
                yield _problem([*location, str(name)], f"unknown field{hint}")
            continue
        if kind.startswith("catalog_"):  # ours: the message says what it found
            location += [context["field"]] if "field" in context else []
            reason = item["msg"]
        elif kind in ("union_tag_invalid", "union_tag_not_found"):  # a rule's 'from'
            location.append("from")
            expected = context.get("expected_tags", "").replace("'", "") or ", ".join(RULE_SOURCES)
            reason = f"must be one of {expected}"
            reason += f" (got {context['tag']!r})" if "tag" in context else ", and is missing"
        elif kind == "missing":
            reason = _PLAIN_REASONS[kind]
        else:
            reason = _PLAIN_REASONS.get(kind) or item["msg"][0].lower() + item["msg"][1:]
            reason += f" (got {_short_repr(item['input'])})"
        yield _problem(location, reason)


def _problem(location: list[str], reason: str) -> str:
    return f"field {'.'.join(location)!r}: {reason}" if location else reason


def _location(loc: tuple[int | str, ...]) -> list[str]:
    """Path parts of a pydantic location, without the rule type pydantic inserts after
    `labels`/`splits` (the YAML has no such level), and list indexes as `[i]`."""
    parts: list[str] = []
    for index, part in enumerate(loc):
        if index and loc[index - 1] in _RULE_FIELDS and part in _RULE_TYPES:
            continue
        if type(part) is int and parts:
            parts[-1] += f"[{part}]"
        else:
            parts.append(str(part))
    return parts


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
