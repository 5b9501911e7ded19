"""What a pipeline stage returns for one partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    """Rows produced by one stage for one partition.

    `records` follow the stage's schema in `schema.py`; `failures` follow `schema.FAILURES`
    (one per bad input file, which was skipped while its siblings finished); `skipped` follows
    `schema.SKIPPED` (one per raw file a standardizing stage does not use, with the reason);
    `rejected` holds the rejected candidates of a filtering stage (tiling); `reused` counts inputs
    found already done by an earlier run with the same source bytes and settings.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    reused: int = 0


def failure(file: str, stage: str, reason: str) -> dict[str, str]:
    return {"file": file, "stage": stage, "reason": reason}


def skip(file: str, reason: str) -> dict[str, str]:
    return {"file": file, "reason": reason}


@dataclass
class RawSelection:
    """A raw folder sorted by a standardizing stage: the files it uses, the files it leaves
    out (relative path, why) and the entries the folder walk refused (relative path, why).

    Together with the stage's outputs and failures this accounts for every raw file (the
    manifest check `raw_files_accounted`).
    """

    used: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    def skipped_rows(self, stored_dir: str) -> list[dict[str, str]]:
        """SKIPPED rows; `stored_dir` is the raw folder as records store it (`raw/<key>`)."""
        return [skip(f"{stored_dir}/{rel}", reason) for rel, reason in self.skipped]

    def refused_rows(self, stored_dir: str, stage: str) -> list[dict[str, str]]:
        """FAILURES rows for the refused entries."""
        return [failure(f"{stored_dir}/{rel}", stage, reason) for rel, reason in self.refused]
