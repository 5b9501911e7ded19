"""Exclusion rules as people write them: spacing, comments and a byte-order mark apply as
written, a rule that cannot match a catalog key is refused naming its line, and rules that
matched no image of the partitions they name are reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cpia_assets.core.training.exclusions import (
    ExclusionError,
    Exclusions,
    ExclusionSettings,
    matched_rules,
    unmatched_rules,
)


def _rows(*sources: str) -> list[dict[str, str]]:
    return [{"source_file": f"raw/wsi/{s}", "image_name": f"{s}-384-0-0", "scale": "M"}
            for s in sources]  # fmt: skip


def test_rules_apply_as_written_with_spaces_comments_and_a_byte_order_mark(tmp_path: Path) -> None:
    listed = tmp_path / "eval.txt"
    listed.write_text(
        "# held-out slides\r\n  wsi : slide-2*   # case 2\r\n\r\n\twsi-b\t\r\n  # end\r\n",
        encoding="utf-8-sig",
    )
    exclusions = Exclusions.load(ExclusionSettings(rules=(" wsi-c :  x* # inline",),
                                                   lists=(str(listed),)))  # fmt: skip
    assert exclusions.texts == ["wsi-c:x*", "wsi:slide-2*", "wsi-b"]
    assert [rule.where for rule in exclusions.rules] == [
        "exclusions.rules", f"{listed}:2", f"{listed}:4"
    ]  # fmt: skip
    assert exclusions.for_key("wsi")(["slide-2.svs"]) and exclusions.whole("wsi-b")


@pytest.mark.parametrize("rule", ["WSI", "wsi slide-2*", "'wsi'", "wsi\\slide", "wsi:"])
def test_a_rule_that_cannot_apply_is_refused_naming_its_line(tmp_path: Path, rule: str) -> None:
    listed = tmp_path / "eval.txt"
    listed.write_text(f"wsi:slide-1*\n# comment\n{rule}\n")
    with pytest.raises(ExclusionError, match=re.escape(f"eval.txt:3: exclusion rule {rule!r}")):
        Exclusions.load(ExclusionSettings(rules=(), lists=(str(listed),)))


def test_rules_that_matched_nothing_in_the_built_partitions_are_reported() -> None:
    exclusions = Exclusions.load(ExclusionSettings(
        rules=("wsi:slide-2*", "wsi:slide-9*", "wsi-*", "later", "other:x*")))  # fmt: skip
    matched = matched_rules("wsi", _rows("slide-1.svs", "slide-2.svs"), exclusions)
    assert sorted(map(str, matched)) == ["wsi:slide-2*"]
    matched |= matched_rules("wsi-b", _rows("b.svs"), exclusions)
    assert unmatched_rules(exclusions, matched, ["wsi", "wsi-b", "other"]) == [
        "exclusions.rules: exclusion rule 'wsi:slide-9*' matched no image of the built "
        "partitions wsi",
        "exclusions.rules: exclusion rule 'other:x*' matched no image of the built "
        "partitions other",
    ]  # 'later' names no built partition: not built yet, not a typo
