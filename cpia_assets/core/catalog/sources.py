"""Validation of `source:` blocks, shared by the catalog loader and `fetch_source`.

Each source type lists its required and optional parameters; anything else is a typo and is
rejected with a did-you-mean hint. Errors name the parameter at fault (`SourceSpecError.problems`).
Credentials never appear in a spec: a spec names the environment variable that holds them
(`token_env`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse

from cpia_assets.core.fsutil import UnsafePathError, safe_relative

LOCAL_MODES = ("symlink", "copy", "hardlink")
"""How a `local` source is brought in."""
GDC_API = "https://api.gdc.cancer.gov"
GDC_STRATEGIES = ("Diagnostic Slide", "Tissue Slide")
IDC_API = "https://api.imaging.datacommons.cancer.gov/v2"
IDC_STORAGE = "https://s3.amazonaws.com"  # public, anonymous S3 endpoint of IDC's buckets
ZENODO_API = "https://zenodo.org/api"
FIGSHARE_API = "https://api.figshare.com/v2"

_CREDENTIAL_KEYS = {"token", "access_token", "password", "api_key", "apikey", "secret", "auth"}
# Matched in full: `$` would also accept a trailing newline.
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "md5": re.compile(r"[0-9a-f]{32}")}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HTTP_FILE_KEYS = ("url", "sha256", "md5", "size", "path", "extract", "extract_to")


class SourceSpecError(ValueError):
    """A `source:` block that is not usable (missing or malformed parameters).

    `problems` pairs each parameter at fault, as a path inside the block (`files[0].sha256`;
    None: the block as a whole), with the reason, so the catalog can name the field.
    """

    def __init__(
        self, reason: str, field: str | None = None, *, more: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.problems: list[tuple[str | None, str]] = [(field, reason), *more]
        super().__init__(
            "; ".join(
                f"source field {name!r}: {why}" if name else why for name, why in self.problems
            )
        )


def validate_source(raw: Any) -> dict[str, Any]:
    """A checked copy of a `source:` mapping; raises SourceSpecError naming the problem."""
    if not isinstance(raw, Mapping) or "type" not in raw:
        raise SourceSpecError("'source' must be a mapping with a 'type'")
    source = dict(raw)
    kind = source["type"]
    if kind not in _CHECKS:
        raise SourceSpecError(f"unknown source type {kind!r} (expected one of {SOURCE_TYPES})")
    leaked = sorted(str(key) for key in source if str(key).lower() in _CREDENTIAL_KEYS)
    if leaked:
        raise SourceSpecError(
            "would put a credential in the catalog; name the environment variable that holds "
            "it with 'token_env' instead",
            leaked[0],
        )
    required, optional, check = _CHECKS[kind]
    if required is not None:
        missing = [key for key in required if source.get(key) in (None, "", [])]
        _raise_all(
            [
                *_unknown_fields(source, ("type", "description", *required, *optional)),
                *[(key, f"required for a {kind} source") for key in missing],
            ]
        )
    check(source)
    return source


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """A hint for a misspelt field name: the closest known name, else all of them."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"


def _unknown_fields(
    block: Mapping[str, Any], known: Iterable[str], where: str = ""
) -> list[tuple[str, str]]:
    known = list(known)
    return [
        (f"{where}{name}", f"unknown field{did_you_mean(name, known)}")
        for name in block
        if name not in known
    ]


def _raise_all(problems: list[tuple[str, str]]) -> None:
    if problems:
        (field, reason), *more = problems
        raise SourceSpecError(reason, field, more=more)


def _check_tcia(source: Mapping[str, Any]) -> None:
    raise SourceSpecError(
        "tcia sources are not downloaded directly: TCIA's slide collections are mirrored, public "
        "and scriptable, in NCI's Imaging Data Commons; use {type: idc, collection_id: ...}, or "
        "{type: manual, landing_page: ...} for collections that IDC does not hold"
    )


def _check_local(source: Mapping[str, Any]) -> None:
    if not isinstance(source["path"], str):
        raise SourceSpecError(f"must be text, got {source['path']!r}", "path")
    mode = source.get("mode")
    if mode is not None and mode not in LOCAL_MODES:
        raise SourceSpecError(f"{mode!r} is not one of {LOCAL_MODES}", "mode")


def _check_http(source: Mapping[str, Any]) -> None:
    files = source["files"]
    if not isinstance(files, list):
        raise SourceSpecError("must be a list of {url, sha256|md5, ...}", "files")
    for index, entry in enumerate(files):
        where = f"files[{index}]"
        if not isinstance(entry, Mapping) or not entry.get("url"):
            raise SourceSpecError("each file needs a 'url'", where)
        _raise_all(_unknown_fields(entry, _HTTP_FILE_KEYS, f"{where}."))
        _check_url(entry["url"], f"{where}.url")
        if not any(entry.get(name) for name in _HEX):
            raise SourceSpecError(f"needs 'sha256' or 'md5' ({entry['url']})", where)
        for name, pattern in _HEX.items():
            if entry.get(name) is not None and not pattern.fullmatch(str(entry[name]).lower()):
                raise SourceSpecError(f"{entry[name]!r} is not a hex digest", f"{where}.{name}")
        size = entry.get("size")
        if size is not None and (type(size) is not int or size < 0):
            raise SourceSpecError("must be a non-negative integer", f"{where}.size")
        for key in ("path", "extract_to"):
            if entry.get(key) not in (None, "", "."):
                _check_relative(entry[key], f"{where}.{key}")
        _check_extract_flag(entry, f"{where}.")


def _check_gdc(source: Mapping[str, Any]) -> None:
    _check_strings(source["project_id"], "project_id")
    strategies = source.get("experimental_strategies", list(GDC_STRATEGIES))
    if not isinstance(strategies, list) or not strategies or set(strategies) - set(GDC_STRATEGIES):
        raise SourceSpecError(
            f"must be a non-empty subset of {GDC_STRATEGIES}", "experimental_strategies"
        )
    _check_api(source)


def _check_idc(source: Mapping[str, Any]) -> None:
    _check_strings(source["collection_id"], "collection_id")
    if "modalities" in source:
        _check_strings(source["modalities"], "modalities")
    _check_api(source)
    if "storage_url" in source:
        _check_url(source["storage_url"], "storage_url")


def _check_record(source: Mapping[str, Any]) -> None:
    key = "record" if source["type"] == "zenodo" else "article"
    if not str(source[key]).isdigit():
        raise SourceSpecError(f"must be a numeric id, got {source[key]!r}", key)
    if "files" in source:
        _check_strings(source["files"], "files")
    _check_api(source)
    _check_extract_flag(source)


def _check_manual(source: Mapping[str, Any]) -> None:
    _check_url(source["landing_page"], "landing_page")
    if not isinstance(source.get("instructions", ""), str):
        raise SourceSpecError("must be text", "instructions")


def _check_synthetic(source: Mapping[str, Any]) -> None:
    if source.get("recipe") not in ("wsi", "roi"):
        raise SourceSpecError("the synthetic source needs 'wsi' or 'roi'", "recipe")


def _check_api(source: Mapping[str, Any]) -> None:
    if "api_url" in source:
        _check_url(source["api_url"], "api_url")
    token_env = source.get("token_env")
    if token_env is not None and not _ENV_NAME.fullmatch(str(token_env)):
        raise SourceSpecError(f"{token_env!r} is not an environment variable name", "token_env")


def _check_url(url: Any, field: str) -> None:
    parsed = urlparse(str(url))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SourceSpecError(f"{url!r} is not an http(s) URL", field)
    in_query = _CREDENTIAL_KEYS & {name.lower() for name in parse_qs(parsed.query)}
    if parsed.username or parsed.password or in_query:
        raise SourceSpecError(
            "the URL carries a credential; name its environment variable with 'token_env' instead",
            field,
        )


def _check_relative(value: Any, field: str) -> None:
    try:
        safe_relative(str(value))
    except UnsafePathError as exc:
        raise SourceSpecError(str(exc), field) from exc


def _check_strings(value: Any, field: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(item, str) and item for item in values):
        raise SourceSpecError("must be a non-empty text or list of texts", field)


def _check_extract_flag(block: Mapping[str, Any], where: str = "") -> None:
    if not isinstance(block.get("extract", True), bool):
        raise SourceSpecError("must be true or false", f"{where}extract")


_Check = Callable[[Mapping[str, Any]], None]
_API = ("api_url", "token_env")
_CHECKS: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...], _Check]] = {
    # type: (required, optional, check); required None = parameters are free-form
    "local": (("path",), ("mode",), _check_local),
    "http": (("files",), (), _check_http),
    "gdc": (("project_id",), ("experimental_strategies", *_API), _check_gdc),
    "idc": (("collection_id",), ("modalities", "storage_url", "api_url"), _check_idc),
    "tcia": (None, (), _check_tcia),
    "zenodo": (("record",), ("files", "extract", *_API), _check_record),
    "figshare": (("article",), ("files", "extract", *_API), _check_record),
    "manual": (("landing_page",), ("instructions",), _check_manual),
    "synthetic": (None, (), _check_synthetic),
}
SOURCE_TYPES = tuple(_CHECKS)
