"""Class labels and train/val/test splits of ROI images, from a catalog entry's rules.

The published CPIA scripts lost most labels; here every image keeps the label and split its
source gives it. Rules are typed models validated when the catalog loads (`rules.py`: from
parent_folder, regex, csv or listed); this module applies them to the images of one source
folder. Label tables are CSV files or .xlsx workbooks (first sheet, read with `xlsx.py`).

A rule yields a raw value for an image's path relative to the source folder; an optional `map`
translates it, and an optional `default` stands in where the rule finds nothing. Split values
must end up train, val or test. Regex rules run on RE2 (`fields.compile_pattern`), in time
linear in the path. An image a rule cannot place is an `AnnotationError` (the image is recorded
as a failure), unless a table rule says `keep_unlisted` (the image keeps no label, split
'none'); a rule that cannot be applied at all (a missing table or column) is a
`LabelRuleError`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cpia_assets.core.catalog.fields import RULE_SPLITS, compile_pattern
from cpia_assets.core.catalog.rules import (
    ConstantLabel,
    CsvRule,
    ListedRule,
    ParentFolderRule,
    RegexRule,
    Rule,
)
from cpia_assets.core.catalog.xlsx import XlsxError, xlsx_rows

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
    """Labels and splits of one source folder's images, with any table read once up front."""

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
        if split is None:  # kept unlisted
            return Annotation(label=label, split=NO_SPLIT)
        if split not in RULE_SPLITS:
            raise AnnotationError(
                f"{relative_path}: split value {split!r} is not one of {RULE_SPLITS}; "
                "translate it with the split rule's 'map'"
            )
        return Annotation(label=label, split=split)


def _compile(
    rule: Rule | ConstantLabel, name: str, source_dir: Path
) -> Callable[[str], str | None]:
    """The rule as a function of the relative path: raw value, then map, then default (None:
    an image a table rule with `keep_unlisted` does not list)."""
    if isinstance(rule, ConstantLabel):
        return lambda _: rule.value
    if isinstance(rule, ParentFolderRule):
        find = _parent_folder_finder(rule)
    elif isinstance(rule, RegexRule):
        find = _regex_finder(rule)
    else:
        find = _table_finder(rule, source_dir)
    keep_unlisted = isinstance(rule, CsvRule | ListedRule) and rule.keep_unlisted

    def value_of(relative_path: str) -> str | None:
        raw = find(relative_path)
        if raw is None:
            if rule.default is None and not keep_unlisted:
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


def _table_finder(rule: CsvRule | ListedRule, source_dir: Path) -> ValueFinder:
    """Look images up in the rule's tables by relative path, else by file name, else by stem.

    A table's image column may hold paths relative to the source folder, bare file names, or
    names without extension. A name or stem shared by rows with different values is ambiguous:
    such images must be listed by relative path.
    """
    table = _LabelTable.read(rule, source_dir)
    key = _normalised if rule.normalise_names else str

    def find(relative_path: str) -> str | None:
        path = PurePosixPath(relative_path)
        for index, name in (
            (table.by_path, path.as_posix()),
            (table.by_name, path.name),
            (table.by_stem, path.stem),
        ):
            values = index.get(key(name))
            if values is None:
                continue
            if len(values) > 1:
                raise AnnotationError(
                    f"{relative_path}: {table.source} gives it several values "
                    f"{sorted(values)} under {name!r}; list it by its relative path"
                )
            return next(iter(values))
        return None

    return find


def _normalised(name: str) -> str:
    """A name with case ignored and runs of spaces, hyphens and underscores read as one '-'."""
    return re.sub(r"[\s_-]+", "-", name.strip()).casefold()


@dataclass(frozen=True)
class _LabelTable:
    source: str
    by_path: dict[str, set[str]]
    by_name: dict[str, set[str]]
    by_stem: dict[str, set[str]]

    @classmethod
    def read(cls, rule: CsvRule | ListedRule, source_dir: Path) -> _LabelTable:
        key = _normalised if rule.normalise_names else str
        table = cls(source=", ".join(rule.tables), by_path={}, by_name={}, by_stem={})
        for file in rule.tables:
            for image, values in _row_values(source_dir / file, rule, file):
                image_path = PurePosixPath(image.replace("\\", "/").removeprefix("./"))
                for index, name in (
                    (table.by_path, image_path.as_posix()),
                    (table.by_name, image_path.name),
                    (table.by_stem, image_path.stem),
                ):
                    index.setdefault(key(name), set()).update(values)
        return table


def _row_values(
    path: Path, rule: CsvRule | ListedRule, file: str
) -> Iterator[tuple[str, set[str]]]:
    """(image, values) of each row of table `file` that names an image and gives it a value;
    a one-hot row with several columns set gives them all (the image is then ambiguous)."""
    columns = [rule.image_column]
    if isinstance(rule, CsvRule):
        columns += [rule.column] if rule.column else list(rule.one_hot)
    for row in _read_rows(path, columns, delimiter=rule.delimiter):
        image = row[rule.image_column].strip()
        if isinstance(rule, ListedRule):
            values = {rule.files[file]}
        elif rule.column:
            values = {row[rule.column].strip()} - {""}
        else:
            values = {column for column in rule.one_hot if _is_one(row[column])}
        if image and values:
            yield image, values


def _is_one(cell: str) -> bool:
    try:
        return float(cell) == 1
    except ValueError:
        return False


def _read_rows(path: Path, columns: list[str], *, delimiter: str) -> list[dict[str, str]]:
    """The rows of a CSV file or of an .xlsx workbook's first sheet, as {header: text}; the
    header row must hold every one of `columns`."""
    try:
        if path.suffix.lower() == ".xlsx":
            rows = xlsx_rows(path)
        else:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.reader(handle, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error, XlsxError) as exc:
        raise LabelRuleError(f"{path}: cannot read the label table: {exc}") from exc
    if not rows:
        raise LabelRuleError(f"{path}: the label table is empty")
    header, *body = rows
    missing = sorted(set(columns) - set(header))
    if missing:
        raise LabelRuleError(f"{path}: column(s) {missing} not found (header: {header})")
    return [dict(zip(header, row + [""] * (len(header) - len(row)), strict=False)) for row in body]
