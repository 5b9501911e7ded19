"""Class labels and train/val/test splits of ROI images, from a catalog entry's rules.

The published CPIA scripts lost most labels; here every image keeps the label and split its
source gives it. Rules are typed models validated when the catalog loads (`catalog.Rule`: from
parent_folder, regex or csv); this module applies them to the images of one source folder.

A rule yields a raw value for an image's path relative to the source folder; an optional `map`
translates it, and an optional `default` stands in where the rule finds nothing. Split values
must end up train, val or test. Regex rules run on RE2 (`catalog.compile_pattern`), in time
linear in the path. An image a rule cannot place is an `AnnotationError` (the image is recorded
as a failure); a rule that cannot be applied at all (a missing CSV file or column) is a
`LabelRuleError`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cpia_assets.core.catalog import (
    RULE_SPLITS,
    ConstantLabel,
    CsvRule,
    ParentFolderRule,
    RegexRule,
    Rule,
    compile_pattern,
)

NO_SPLIT = "none"
"""The split of every image of an entry without a split rule."""


class LabelRuleError(ValueError):
    """A label or split rule that cannot be applied to a source folder (names file and reason)."""


class AnnotationError(ValueError):
    """One image that a label or split rule cannot place (names the image and the reason)."""


@dataclass(frozen=True)
class Annotation:
    label: str | None
    split: str


ValueFinder = Callable[[str], str | None]
"""Raw rule value for a path relative to the source folder; None = the rule found nothing."""


class Annotator:
    """Labels and splits of one source folder's images, with any CSV read once up front."""

    def __init__(
        self,
        *,
        labels: Rule | ConstantLabel | None,
        splits: Rule | None,
        source_dir: Path,
    ) -> None:
        self._labels = _compile(labels, "labels", source_dir) if labels else None
        self._splits = _compile(splits, "splits", source_dir) if splits else None

    def annotate(self, relative_path: str) -> Annotation:
        """Label and split of one image; raises AnnotationError when a rule cannot place it."""
        label = self._labels(relative_path) if self._labels else None
        if self._splits is None:
            return Annotation(label=label, split=NO_SPLIT)
        split = self._splits(relative_path)
        if split not in RULE_SPLITS:
            raise AnnotationError(
                f"{relative_path}: split value {split!r} is not one of {RULE_SPLITS}; "
                "translate it with the split rule's 'map'"
            )
        return Annotation(label=label, split=split)


def _compile(rule: Rule | ConstantLabel, name: str, source_dir: Path) -> Callable[[str], str]:
    """The rule as a function of the relative path: raw value, then map, then default."""
    if isinstance(rule, ConstantLabel):
        return lambda _: rule.value
    if isinstance(rule, ParentFolderRule):
        find = _parent_folder_finder(rule)
    elif isinstance(rule, RegexRule):
        find = _regex_finder(rule)
    else:
        find = _csv_finder(rule, source_dir)

    def value_of(relative_path: str) -> str:
        raw = find(relative_path)
        if raw is None:
            if rule.default is None:
                raise AnnotationError(
                    f"{relative_path}: the {name} rule (from {rule.from_}) gives no value"
                )
            return rule.default
        return rule.map.get(raw, raw)

    return value_of


def _parent_folder_finder(rule: ParentFolderRule) -> ValueFinder:
    level = rule.level

    def find(relative_path: str) -> str | None:
        folders = PurePosixPath(relative_path).parts[:-1]
        return folders[-level] if level <= len(folders) else None

    return find


def _regex_finder(rule: RegexRule) -> ValueFinder:
    pattern = compile_pattern(rule.pattern)

    def find(relative_path: str) -> str | None:
        match = pattern.search(relative_path)
        return match.group("value") if match and match.group("value") else None

    return find


def _csv_finder(rule: CsvRule, source_dir: Path) -> ValueFinder:
    """Look images up in a CSV by relative path, else by file name, else by stem.

    The CSV's image column may hold paths relative to the source folder, bare file names, or
    names without extension. A name or stem shared by rows with different values is ambiguous:
    such images must be listed by relative path.
    """
    table = _CsvTable.read(source_dir / rule.file, rule)

    def find(relative_path: str) -> str | None:
        path = PurePosixPath(relative_path)
        for index, key in (
            (table.by_path, path.as_posix()),
            (table.by_name, path.name),
            (table.by_stem, path.stem),
        ):
            values = index.get(key)
            if values is None:
                continue
            if len(values) > 1:
                raise AnnotationError(
                    f"{relative_path}: {table.path.name} gives it several values "
                    f"{sorted(values)} under {key!r}; list it by its relative path"
                )
            return next(iter(values))
        return None

    return find


@dataclass(frozen=True)
class _CsvTable:
    path: Path
    by_path: dict[str, set[str]]
    by_name: dict[str, set[str]]
    by_stem: dict[str, set[str]]

    @classmethod
    def read(cls, path: Path, rule: CsvRule) -> _CsvTable:
        image_column, value_column = rule.image_column, rule.column
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, delimiter=rule.delimiter)
                missing = {image_column, value_column} - set(reader.fieldnames or ())
                if missing:
                    raise LabelRuleError(
                        f"{path}: column(s) {sorted(missing)} not found "
                        f"(header: {reader.fieldnames})"
                    )
                rows = [(row[image_column], row[value_column]) for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise LabelRuleError(f"{path}: cannot read the label CSV: {exc}") from exc
        table = cls(path=path, by_path={}, by_name={}, by_stem={})
        for image, value in rows:
            value = (value or "").strip()
            if not image or not value:
                continue
            image_path = PurePosixPath(image.strip().replace("\\", "/").removeprefix("./"))
            table.by_path.setdefault(image_path.as_posix(), set()).add(value)
            table.by_name.setdefault(image_path.name, set()).add(value)
            table.by_stem.setdefault(image_path.stem, set()).add(value)
        return table
