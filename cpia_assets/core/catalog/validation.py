"""One raw catalog entry made a `SubDataset`, or its problems in the catalog's own words:
"field '<path>': <reason>", with YAML's names for types and the rule levels YAML does not have
left out of the path."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from cpia_assets.core.catalog.model import SubDataset
from cpia_assets.core.catalog.rules import RULE_SOURCES, RULE_TYPES
from cpia_assets.core.catalog.sources import SourceSpecError, validate_source


class EntryError(Exception):
    """The problems of one entry, each "field '<path>': <reason>"."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def entry_label(raw: Any, number: int) -> str:
    key = raw.get("key") if isinstance(raw, Mapping) else None
    return f"entry {key!r} (#{number})" if isinstance(key, str) else f"entry #{number}"


def parse_entry(raw: Any) -> SubDataset:
    try:
        entry = SubDataset.model_validate(raw)
    except ValidationError as exc:
        raise EntryError(list(_describe(exc))) from None
    try:
        source = validate_source(entry.source)
    except SourceSpecError as exc:
        raise EntryError(
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
        if index and loc[index - 1] in _RULE_FIELDS and part in RULE_TYPES:
            continue
        if type(part) is int and parts:
            parts[-1] += f"[{part}]"
        else:
            parts.append(str(part))
    return parts


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
