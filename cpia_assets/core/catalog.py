"""The sub-dataset catalog: one entry per CPIA source dataset, one Dagster partition each.

A catalog is a YAML file with a top-level `subdatasets:` list; see README "Catalog format".
It is validated on load: every problem names the file, the entry and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cpia_assets.core.downloads import SourceSpecError, validate_source

KINDS = ("wsi", "roi")
ROI_SCALES = ("L", "M", "S")
ALL_SCALES = ("XL", "L", "M", "S")
RULE_SOURCES = ("parent_folder", "regex", "csv")
SPLITS = ("train", "val", "test", "none")
KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
BUILTIN_CATALOGS = {"cpia": "cpia.yaml", "demo": "demo.yaml"}

TABLE_I_ORGANS = (
    "adrenal gland", "bladder", "blood", "bone", "bone marrow", "brain", "breast",
    "canine cutaneous", "cervix uteri", "colon", "colorectum", "connective tissue",
    "eye and adnexa", "head and neck", "kidney", "liver", "lung", "lymph", "oral cavity", "ovary",
    "pancreas", "prostate", "skin", "stomach", "testis", "thyroid", "uterus", "multiple organs",
)  # fmt: skip
"""The organ rows of the paper's Table I, in its order."""

_ENTRY_FIELDS = {
    "key", "name", "kind", "organ", "scale", "scale_rules", "labelled", "labels", "splits",
    "crop", "wsi", "published_counts", "source", "description",
}  # fmt: skip


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class ScaleRule:
    """Images whose path (relative to the source folder) matches `pattern` go to `scale`."""

    pattern: str
    scale: str


@dataclass(frozen=True)
class WsiOptions:
    """How slides of one WSI sub-dataset are opened and how their resolution is found."""

    mpp_overrides: Mapping[str, float] = field(default_factory=dict)  # by file name (or stem)
    use_objective_power: bool = False  # opt in: MPP = 10 / objective power, flagged an estimate
    allow_plain_images: bool = False  # opt in: read flat TIFF/PNG/JPEG through pyvips
    patterns: tuple[str, ...] = ()  # glob patterns selecting slide files; empty = by extension


@dataclass(frozen=True)
class SubDataset:
    key: str
    name: str
    kind: str
    organ: str
    source: Mapping[str, Any]
    labelled: bool = False
    scale: str | None = None
    scale_rules: tuple[ScaleRule, ...] = ()
    labels: Mapping[str, Any] | None = None
    splits: Mapping[str, Any] | None = None
    crop: Mapping[str, Any] | None = None
    wsi: WsiOptions = field(default_factory=WsiOptions)
    published_counts: Mapping[str, int] = field(default_factory=dict)
    description: str = ""

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
            if re.search(rule.pattern, relative_path):
                return rule.scale
        return self.scale


@dataclass(frozen=True)
class Catalog:
    path: Path
    subdatasets: tuple[SubDataset, ...]

    @property
    def keys(self) -> list[str]:
        return [entry.key for entry in self.subdatasets]

    def get(self, key: str) -> SubDataset:
        for entry in self.subdatasets:
            if entry.key == key:
                return entry
        raise KeyError(f"sub-dataset {key!r} is not in catalog {self.path}")


def resolve_catalog_path(spec: str | Path | None) -> Path:
    """`demo`/`cpia` name a built-in catalog; anything else is a file path. Default: full CPIA."""
    spec = str(spec) if spec else "cpia"
    if spec in BUILTIN_CATALOGS:
        return Path(str(resources.files("cpia_assets") / "catalogs" / BUILTIN_CATALOGS[spec]))
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise CatalogError(f"catalog file {path} does not exist (CPIA_CATALOG={spec!r})")
    return path


def load_catalog(spec: str | Path | None = None) -> Catalog:
    path = resolve_catalog_path(spec)
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("subdatasets"), list):
        raise CatalogError(f"{path}: expected a top-level 'subdatasets:' list")
    entries = []
    seen: set[str] = set()
    for index, raw in enumerate(document["subdatasets"]):
        where = f"{path}: subdatasets[{index}]"
        if isinstance(raw, dict) and raw.get("key"):
            where += f" (key {raw['key']!r})"
        entry = _parse_entry(raw, where, base_dir=path.parent)
        if entry.key in seen:
            raise CatalogError(f"{where}: duplicate key {entry.key!r}")
        seen.add(entry.key)
        entries.append(entry)
    if not entries:
        raise CatalogError(f"{path}: the 'subdatasets:' list is empty")
    return Catalog(path=path, subdatasets=tuple(entries))


def _parse_entry(raw: Any, where: str, base_dir: Path) -> SubDataset:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: each entry must be a mapping")
    unknown = set(raw) - _ENTRY_FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {sorted(unknown)}")
    for required in ("key", "name", "kind", "organ", "source"):
        if raw.get(required) in (None, ""):
            raise CatalogError(f"{where}: missing required field {required!r}")
    key = str(raw["key"])
    if not KEY_PATTERN.match(key):
        raise CatalogError(f"{where}: key {key!r} must be lower-case letters, digits and '-'")
    kind = raw["kind"]
    if kind not in KINDS:
        raise CatalogError(f"{where}: unknown kind {kind!r} (expected one of {KINDS})")
    source = _parse_source(raw["source"], where, base_dir)
    scale = raw.get("scale")
    rules = tuple(_parse_scale_rule(r, where) for r in raw.get("scale_rules") or ())
    if kind == "roi":
        if scale is None and not rules:
            raise CatalogError(f"{where}: ROI sub-datasets need 'scale' or 'scale_rules'")
        if scale is not None and scale not in ROI_SCALES:
            raise CatalogError(f"{where}: unknown scale {scale!r} (expected one of {ROI_SCALES})")
    elif scale is not None or rules:
        raise CatalogError(f"{where}: 'scale' and 'scale_rules' apply to ROI sub-datasets only")
    counts = raw.get("published_counts") or {}
    for count_scale, count in counts.items():
        if count_scale not in ALL_SCALES or not isinstance(count, int) or count < 0:
            raise CatalogError(f"{where}: bad published_counts entry {count_scale!r}: {count!r}")
    labels = _parse_rule(raw.get("labels"), "labels", where)
    splits = _parse_rule(raw.get("splits"), "splits", where)
    crop = raw.get("crop")
    if crop is not None:
        fraction = crop.get("fraction") if isinstance(crop, dict) else None
        if not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise CatalogError(f"{where}: crop needs 'fraction' in (0, 1], got {crop!r}")
    return SubDataset(
        key=key,
        name=str(raw["name"]),
        kind=kind,
        organ=str(raw["organ"]),
        source=source,
        labelled=bool(raw.get("labelled", False)),
        scale=scale,
        scale_rules=rules,
        labels=labels,
        splits=splits,
        crop=crop,
        wsi=_parse_wsi_options(raw.get("wsi"), where) if kind == "wsi" else WsiOptions(),
        published_counts=dict(counts),
        description=str(raw.get("description", "")),
    )


def _parse_source(raw: Any, where: str, base_dir: Path) -> dict[str, Any]:
    """Each source type's parameters are checked by `downloads.validate_source`."""
    try:
        source = validate_source(raw)
    except SourceSpecError as exc:
        raise CatalogError(f"{where}: {exc}") from exc
    if source["type"] == "local":
        # Relative paths are relative to the catalog file, so a catalog travels with its data.
        source["path"] = str((base_dir / Path(source["path"]).expanduser()).resolve())
    return source


def _parse_scale_rule(raw: Any, where: str) -> ScaleRule:
    if not isinstance(raw, dict) or "pattern" not in raw or raw.get("scale") not in ROI_SCALES:
        raise CatalogError(f"{where}: scale rule {raw!r} needs 'pattern' and scale L, M or S")
    try:
        re.compile(raw["pattern"])
    except re.error as exc:
        raise CatalogError(f"{where}: bad scale rule pattern {raw['pattern']!r}: {exc}") from exc
    return ScaleRule(pattern=raw["pattern"], scale=raw["scale"])


def _parse_rule(raw: Any, name: str, where: str) -> dict[str, Any] | None:
    """Validate a `labels` or `splits` rule; returns it with defaults filled in.

    A rule gives each ROI image a value from its path relative to the source folder:

    - `{from: parent_folder, level: 1}`: the name of the image's folder at that level
      (1 = its immediate parent, 2 = the grandparent, ...; default 1).
    - `{from: regex, pattern: '...(?P<value>...)...'}`: the `value` group of the first match
      searched in the relative path.
    - `{from: csv, file: labels.csv, image_column: image, column: label}`: the `column` value of
      the CSV row (`file` is relative to the source folder) whose `image_column` holds the image's
      relative path, file name or file stem; optional `delimiter` (default ',').

    Any rule may add `map: {raw value: value}` to translate values (e.g. `{Training: train}`) and
    `default: value` for images it finds no value for (otherwise such an image is a failure).
    Every value a split rule yields, after `map`, must be train, val or test; images of an entry
    without a split rule get split 'none', without a label rule label null.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("from") not in RULE_SOURCES:
        raise CatalogError(f"{where}: '{name}' needs 'from' one of {RULE_SOURCES}, got {raw!r}")
    source = raw["from"]
    fields_of_source = {
        "parent_folder": {"level"},
        "regex": {"pattern"},
        "csv": {"file", "image_column", "column", "delimiter"},
    }
    unknown = set(raw) - fields_of_source[source] - {"from", "map", "default"}
    if unknown:
        raise CatalogError(f"{where}: {name} from {source} has unknown field(s) {sorted(unknown)}")
    rule = dict(raw)
    if source == "parent_folder":
        rule["level"] = raw.get("level", 1)
        if type(rule["level"]) is not int or rule["level"] < 1:
            raise CatalogError(f"{where}: {name} level must be an integer >= 1, got {raw!r}")
    if source == "regex":
        pattern = raw.get("pattern", "")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise CatalogError(f"{where}: bad {name} pattern {pattern!r}: {exc}") from exc
        if "value" not in compiled.groupindex:
            raise CatalogError(f"{where}: {name} pattern {pattern!r} needs a (?P<value>...) group")
    if source == "csv":
        if not all(raw.get(k) for k in ("file", "image_column", "column")):
            raise CatalogError(
                f"{where}: {name} from csv needs 'file', 'image_column' and 'column'"
            )
        delimiter = raw.get("delimiter", ",")
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise CatalogError(f"{where}: {name} csv delimiter must be one character")
    mapping = raw.get("map") or {}
    if not isinstance(mapping, dict):
        raise CatalogError(f"{where}: {name} 'map' must be a mapping, got {mapping!r}")
    rule["map"] = {str(key): str(value) for key, value in mapping.items()}
    if rule.get("default") is not None:
        rule["default"] = str(rule["default"])
    if name == "splits":
        split_values = tuple(split for split in SPLITS if split != "none")
        bad = {*rule["map"].values(), rule.get("default")} - {*split_values, None}
        if bad:
            raise CatalogError(
                f"{where}: splits rule maps to {sorted(bad)}; values must be one of {split_values}"
            )
    return rule


def _parse_wsi_options(raw: Any, where: str) -> WsiOptions:
    if raw is None:
        return WsiOptions()
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: 'wsi' must be a mapping")
    overrides = raw.get("mpp_overrides") or {}
    for name, mpp in overrides.items():
        if not isinstance(mpp, int | float) or mpp <= 0:
            raise CatalogError(f"{where}: mpp override for {name!r} must be a positive number")
    return WsiOptions(
        mpp_overrides={str(k): float(v) for k, v in overrides.items()},
        use_objective_power=bool(raw.get("use_objective_power", False)),
        allow_plain_images=bool(raw.get("allow_plain_images", False)),
        patterns=tuple(raw.get("patterns") or ()),
    )
