"""Evaluation hygiene: which images never enter pre-training data, for Mini and every export.

Two rules hold images out (`held_out`), and every pre-training variant applies both:
- **Evaluation splits.** The val and test images of a labelled ROI set (its split in the records,
  which also holds any validation part carved from train, `catalog/splits.py`).
- **Exclusion rules.** Everything an evaluation task's images come from (`PAPER_TASK_SOURCES`
  for the paper's three tasks, the defaults), and any rule a user adds.

A task declares where its images come from as exclusion rules (FinetuneSettings.task_sources);
the evaluation checks that every checkpoint's data held those out (`covers`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from cpia_assets.core.catalog.model import SubDataset
from cpia_assets.core.schema import MiniReason

PAPER_TASK_SOURCES: Mapping[str, tuple[str, ...]] = {
    # The CAM16 ROIs are cut from Camelyon16 slides and the paper does not say which, so every
    # Camelyon16 slide is a possible source; PCam's patches are cut from the same slides.
    "CAM16": ("cam16", "pcam"),
    # Raabin-WBC's official Test-A is the test set (its validation part is carved from Train
    # and held out by the split); Test-A under both spellings in case a split map misses it.
    "WBC": ("wbc:*TestA/*", "wbc:*Test-A/*"),
    # pRCC's ROIs are cut from TCGA-KIRP slides and no case list ships: all of both.
    "pRCC": ("prcc", "tcga-kirp"),
}
"""Where the images of the paper's evaluation tasks come from, as exclusion rules."""

DEFAULT_EXCLUSIONS = tuple(rule for rules in PAPER_TASK_SOURCES.values() for rule in rules)
EVALUATION_SPLITS = frozenset({"val", "test"})
"""Splits of a labelled ROI set that never enter pre-training."""


class ExclusionError(ValueError):
    """An exclusion rule or list that cannot be used; the message names it and the reason."""


@dataclass(frozen=True)
class ExclusionSettings:
    """Images that never enter pre-training data. A rule is `<sub-dataset glob>` (the whole
    sub-dataset) or `<sub-dataset glob>:<name glob>`, the name glob matched against the source
    path below raw/<key>/, the source file's name and stem, and the image name (slides, patients
    by name prefix, single images). `lists` are files of such rules, one per line (UTF-8, a
    byte-order mark allowed; `#` starts a comment at the start of a line or after a space).
    Spaces around a rule and its ':' are ignored; a rule that is not of this form, or whose
    sub-dataset glob cannot match a catalog key (keys are lower-case letters, digits and '-'),
    is refused naming its line."""

    rules: tuple[str, ...] = DEFAULT_EXCLUSIONS
    lists: tuple[str, ...] = ()


_KEY_GLOB = re.compile(r"[a-z0-9\-*?\[\]!]+")
"""What a sub-dataset glob may hold: catalog key characters and fnmatch's wildcards."""
_COMMENT = re.compile(r"(^|\s)#.*$")


@dataclass(frozen=True)
class ExclusionRule:
    subdatasets: str
    names: str | None  # None: the whole sub-dataset
    where: str = field(default="", compare=False)
    """Where the rule was written (`exclusions.rules`, `<list file>:<line>`), for messages."""

    @classmethod
    def parse(cls, text: str, where: str) -> ExclusionRule:
        """The rule written in `text` (spaces around it and its ':' ignored, the comment
        after a space dropped), or an ExclusionError naming `where`."""
        rule = _COMMENT.sub("", text.removeprefix("\ufeff")).strip()
        key, separator, names = (part.strip() for part in rule.partition(":"))
        if not key or (separator and not names):
            raise ExclusionError(
                f"{where}: exclusion rule {text!r} is not '<key glob>[:<name glob>]'"
            )
        if not _KEY_GLOB.fullmatch(key):
            raise ExclusionError(
                f"{where}: exclusion rule {text!r}: sub-dataset glob {key!r} can match no "
                "catalog key (lower-case letters, digits and '-', with * ? [ ])"
            )
        return cls(key, names or None, where)

    def __str__(self) -> str:
        return self.subdatasets if self.names is None else f"{self.subdatasets}:{self.names}"


@dataclass(frozen=True)
class Exclusions:
    rules: tuple[ExclusionRule, ...]

    @classmethod
    def load(cls, settings: ExclusionSettings) -> Exclusions:
        """The settings' rules plus those of every list file (missing or unreadable: an error
        naming the file, since silently dropping an exclusion would leak test images)."""
        rules = [ExclusionRule.parse(text, "exclusions.rules") for text in settings.rules]
        for listed in settings.lists:
            try:
                lines = Path(listed).read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ExclusionError(f"{listed}: cannot read the exclusion list: {exc}") from exc
            for number, line in enumerate(lines, 1):
                if _COMMENT.sub("", line).strip():
                    rules.append(ExclusionRule.parse(line, f"{listed}:{number}"))
        return cls(tuple(rules))

    @property
    def texts(self) -> list[str]:
        return [str(rule) for rule in self.rules]

    def whole(self, key: str) -> bool:
        """Is the sub-dataset `key` excluded entirely?"""
        return any(r.names is None and fnmatchcase(key, r.subdatasets) for r in self.rules)

    def for_key(self, key: str) -> Callable[[Iterable[str]], bool]:
        """A test of an image's names against the name rules that apply to `key`."""
        patterns = [r.names for r in self.rules if r.names and fnmatchcase(key, r.subdatasets)]
        return lambda names: any(fnmatchcase(n, p) for p in patterns for n in names)


def covers(applied: Sequence[str], declared: Sequence[str]) -> list[str]:
    """The `declared` source rules that the `applied` exclusion rules do not hold out (a rule is
    held out by the same rule or by a whole-sub-dataset rule matching its sub-dataset glob)."""
    rules = [ExclusionRule.parse(text, "applied exclusions") for text in applied]
    missing = []
    for text in declared:
        wanted = ExclusionRule.parse(text, "task sources")
        if not any(
            rule == wanted
            or (rule.names is None and fnmatchcase(wanted.subdatasets, rule.subdatasets))
            for rule in rules
        ):
            missing.append(text)
    return missing


def source_names(key: str, row: Mapping[str, Any]) -> list[str]:
    """What exclusion name globs are matched against (see ExclusionSettings)."""
    source = str(row.get("source_file") or "")
    relative = source.split(f"raw/{key}/", 1)[-1]
    pure = PurePosixPath(relative)
    return [relative, pure.name, pure.name.split(".", 1)[0], row["image_name"]]


def identity(row: Mapping[str, Any]) -> tuple[str, str]:
    """(scale, name): names are unique per scale folder only."""
    return row["scale"], row["image_name"]


def held_out(
    entry: SubDataset, rows: Iterable[Mapping[str, Any]], exclusions: Exclusions
) -> dict[tuple[str, str], str]:
    """The identities of `entry`'s image rows (TILES or MINI_IMAGES) that never enter
    pre-training, each with its MiniReason (excluded for evaluation, or val/test split)."""
    whole = exclusions.whole(entry.key)
    excludes = exclusions.for_key(entry.key)
    evaluated = entry.kind == "roi" and entry.labelled
    reasons = {}
    for row in rows:
        if whole or excludes(source_names(entry.key, row)):
            reasons[identity(row)] = MiniReason.EXCLUDED
        elif evaluated and row.get("split") in EVALUATION_SPLITS:
            reasons[identity(row)] = MiniReason.EVAL_SPLIT
    return reasons


def matched_rules(
    key: str, rows: Iterable[Mapping[str, Any]], exclusions: Exclusions
) -> set[ExclusionRule]:
    """The rules that hold out at least one of `rows` (image rows of sub-dataset `key`)."""
    targeting = [rule for rule in exclusions.rules if fnmatchcase(key, rule.subdatasets)]
    whole = {rule for rule in targeting if rule.names is None}
    pending = set(targeting) - whole
    matched: set[ExclusionRule] = set()
    for row in rows:
        matched |= whole
        names = source_names(key, row)
        found = {rule for rule in pending if any(fnmatchcase(n, rule.names) for n in names)}
        matched |= found
        pending -= found
        if not pending:
            break
    return matched


def unmatched_rules(
    exclusions: Exclusions, matched: set[ExclusionRule], built: Iterable[str]
) -> list[str]:
    """One line per rule that held out no image of the `built` partitions it names (usually a
    typo); a rule naming only partitions not built yet is not reported."""
    built = list(built)
    lines = []
    for rule in exclusions.rules:
        targets = [key for key in built if fnmatchcase(key, rule.subdatasets)]
        if targets and rule not in matched:
            lines.append(
                f"{rule.where}: exclusion rule {str(rule)!r} matched no image of the built "
                f"partitions {', '.join(targets)}"
            )
    return lines
