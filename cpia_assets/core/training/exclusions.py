"""Evaluation hygiene: images that must never enter pre-training data (CPIA-Mini).

The paper evaluates on Camelyon16, Raabin-WBC and pRCC, whose sources are also CPIA
sub-datasets, so their test images are excluded by default (`DEFAULT_EXCLUSIONS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

DEFAULT_EXCLUSIONS = (
    "cam16:*test_*",  # Camelyon16 test slides (the CAM16 evaluation)
    "wbc:*TestA/*",  # Raabin-WBC Test-A (the WBC evaluation), under both spellings
    "wbc:*Test-A/*",
    "prcc",  # pRCC itself (the pRCC evaluation) ...
    "tcga-kirp",  # ... and its source: no case list ships, so every TCGA-KIRP slide
)


class ExclusionError(ValueError):
    """An exclusion rule or list that cannot be used; the message names it and the reason."""


@dataclass(frozen=True)
class ExclusionSettings:
    """Images that never enter Mini. A rule is `<sub-dataset glob>` (the whole sub-dataset) or
    `<sub-dataset glob>:<name glob>`, the name glob matched against the source path below
    raw/<key>/, the source file's name and stem, and the image name (slides, patients by name
    prefix, single images). `lists` are files of such rules, one per line (# comments)."""

    rules: tuple[str, ...] = DEFAULT_EXCLUSIONS
    lists: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExclusionRule:
    subdatasets: str
    names: str | None  # None: the whole sub-dataset

    @classmethod
    def parse(cls, text: str, where: str) -> ExclusionRule:
        key, separator, names = text.strip().partition(":")
        if not key or (separator and not names):
            raise ExclusionError(
                f"{where}: exclusion rule {text!r} is not '<key glob>[:<name glob>]'"
            )
        return cls(key, names or None)


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
                lines = Path(listed).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ExclusionError(f"{listed}: cannot read the exclusion list: {exc}") from exc
            for number, line in enumerate(lines, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    rules.append(ExclusionRule.parse(line, f"{listed}:{number}"))
        return cls(tuple(rules))

    def whole(self, key: str) -> bool:
        """Is the sub-dataset `key` excluded entirely?"""
        return any(r.names is None and fnmatchcase(key, r.subdatasets) for r in self.rules)

    def for_key(self, key: str) -> Callable[[Iterable[str]], bool]:
        """A test of an image's names against the name rules that apply to `key`."""
        patterns = [r.names for r in self.rules if r.names and fnmatchcase(key, r.subdatasets)]
        return lambda names: any(fnmatchcase(n, p) for p in patterns for n in names)
