"""What a pipeline stage returns for one partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageResult:
    """Rows produced by one stage for one partition.

    `records` follow the stage's schema in `schema.py`; `failures` follow `schema.FAILURES`
    (one per bad input file, which was skipped while its siblings finished); `rejected` holds the
    rejected candidates of a filtering stage (tiling); `reused` counts inputs found already done
    by an earlier run with the same source bytes and settings.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    reused: int = 0


def failure(file: str, stage: str, reason: str) -> dict[str, str]:
    return {"file": file, "stage": stage, "reason": reason}
