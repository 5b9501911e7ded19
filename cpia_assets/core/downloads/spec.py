"""Validation of `source:` blocks, shared by the catalog loader and `fetch_source`.

Each source type lists its required and optional parameters; anything else is a typo and is
rejected. Credentials never appear in a spec: a spec names the environment variable that holds
them (`token_env`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlparse

from cpia_assets.core.downloads.errors import SourceSpecError
from cpia_assets.core.downloads.paths import UnsafePathError, safe_relative
from cpia_assets.core.downloads.settings import LOCAL_MODES

GDC_API = "https://api.gdc.cancer.gov"
GDC_STRATEGIES = ("Diagnostic Slide", "Tissue Slide")
IDC_API = "https://api.imaging.datacommons.cancer.gov/v2"
IDC_STORAGE = "https://s3.amazonaws.com"  # public, anonymous S3 endpoint of IDC's buckets
ZENODO_API = "https://zenodo.org/api"
FIGSHARE_API = "https://api.figshare.com/v2"

_CREDENTIAL_KEYS = {"token", "access_token", "password", "api_key", "apikey", "secret", "auth"}
_HEX = {"sha256": re.compile(r"^[0-9a-f]{64}$"), "md5": re.compile(r"^[0-9a-f]{32}$")}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HTTP_FILE_KEYS = {"url", "sha256", "md5", "size", "path", "extract", "extract_to"}


def validate_source(raw: Any) -> dict[str, Any]:
    """A checked copy of a `source:` mapping; raises SourceSpecError naming the problem."""
    if not isinstance(raw, Mapping) or "type" not in raw:
        raise SourceSpecError("'source' must be a mapping with a 'type'")
    source = dict(raw)
    kind = source["type"]
    if kind not in _CHECKS:
        raise SourceSpecError(f"unknown source type {kind!r} (expected one of {SOURCE_TYPES})")
    leaked = _CREDENTIAL_KEYS & {str(key).lower() for key in source}
    if leaked:
        raise SourceSpecError(
            f"{kind} source: {sorted(leaked)} would put a credential in the catalog; name the "
            "environment variable that holds it with 'token_env' instead"
        )
    required, optional, check = _CHECKS[kind]
    if required is not None:
        missing = [key for key in required if source.get(key) in (None, "", [])]
        if missing:
            raise SourceSpecError(f"{kind} source needs {missing}")
        unknown = set(source) - {"type", "description"} - set(required) - set(optional)
        if unknown:
            raise SourceSpecError(
                f"{kind} source: unknown parameter(s) {sorted(unknown)} (allowed: "
                f"{sorted(set(required) | set(optional))})"
            )
    check(source)
    return source


def _check_tcia(source: Mapping[str, Any]) -> None:
    raise SourceSpecError(
        "tcia sources are not downloaded directly: TCIA's slide collections are mirrored, public "
        "and scriptable, in NCI's Imaging Data Commons; use {type: idc, collection_id: ...}, or "
        "{type: manual, landing_page: ...} for collections that IDC does not hold"
    )


def _check_local(source: Mapping[str, Any]) -> None:
    mode = source.get("mode")
    if mode is not None and mode not in LOCAL_MODES:
        raise SourceSpecError(f"local source: mode {mode!r} is not one of {LOCAL_MODES}")


def _check_http(source: Mapping[str, Any]) -> None:
    files = source["files"]
    if not isinstance(files, list):
        raise SourceSpecError("http source: 'files' must be a list of {url, sha256|md5, ...}")
    for index, entry in enumerate(files):
        where = f"http source files[{index}]"
        if not isinstance(entry, Mapping) or not entry.get("url"):
            raise SourceSpecError(f"{where}: each file needs a 'url'")
        unknown = set(entry) - _HTTP_FILE_KEYS
        if unknown:
            raise SourceSpecError(f"{where}: unknown key(s) {sorted(unknown)}")
        _check_url(entry["url"], where)
        if not any(entry.get(name) for name in _HEX):
            raise SourceSpecError(f"{where} ({entry['url']}): needs 'sha256' or 'md5'")
        for name, pattern in _HEX.items():
            if entry.get(name) is not None and not pattern.match(str(entry[name]).lower()):
                raise SourceSpecError(f"{where}: {name} {entry[name]!r} is not a hex digest")
        size = entry.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise SourceSpecError(f"{where}: size must be a non-negative integer")
        for key in ("path", "extract_to"):
            if entry.get(key) not in (None, "", "."):
                _check_relative(entry[key], f"{where}: {key}")
        _check_extract_flag(entry, where)


def _check_gdc(source: Mapping[str, Any]) -> None:
    _check_strings(source["project_id"], "gdc source: project_id")
    strategies = source.get("experimental_strategies", list(GDC_STRATEGIES))
    if not isinstance(strategies, list) or not strategies or set(strategies) - set(GDC_STRATEGIES):
        raise SourceSpecError(
            f"gdc source: experimental_strategies must be a non-empty subset of {GDC_STRATEGIES}"
        )
    _check_api(source)


def _check_idc(source: Mapping[str, Any]) -> None:
    _check_strings(source["collection_id"], "idc source: collection_id")
    if "modalities" in source:
        _check_strings(source["modalities"], "idc source: modalities")
    _check_api(source)
    if "storage_url" in source:
        _check_url(source["storage_url"], "idc source: storage_url")


def _check_record(source: Mapping[str, Any]) -> None:
    kind = source["type"]
    key = "record" if kind == "zenodo" else "article"
    if not str(source[key]).isdigit():
        raise SourceSpecError(f"{kind} source: {key} must be a numeric id, got {source[key]!r}")
    if "files" in source:
        _check_strings(source["files"], f"{kind} source: files")
    _check_api(source)
    _check_extract_flag(source, f"{kind} source")


def _check_manual(source: Mapping[str, Any]) -> None:
    _check_url(source["landing_page"], "manual source: landing_page")
    if not isinstance(source.get("instructions", ""), str):
        raise SourceSpecError("manual source: instructions must be text")


def _check_synthetic(source: Mapping[str, Any]) -> None:
    if source.get("recipe") not in ("wsi", "roi"):
        raise SourceSpecError("synthetic source needs recipe 'wsi' or 'roi'")


def _check_api(source: Mapping[str, Any]) -> None:
    kind = source["type"]
    if "api_url" in source:
        _check_url(source["api_url"], f"{kind} source: api_url")
    token_env = source.get("token_env")
    if token_env is not None and not _ENV_NAME.match(str(token_env)):
        raise SourceSpecError(f"{kind} source: token_env {token_env!r} is not a variable name")


def _check_url(url: Any, where: str) -> None:
    parsed = urlparse(str(url))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SourceSpecError(f"{where}: {url!r} is not an http(s) URL")
    in_query = _CREDENTIAL_KEYS & {name.lower() for name in parse_qs(parsed.query)}
    if parsed.username or parsed.password or in_query:
        raise SourceSpecError(
            f"{where}: the URL carries a credential; name its environment variable with "
            "'token_env' instead"
        )


def _check_relative(value: Any, where: str) -> None:
    try:
        safe_relative(str(value))
    except UnsafePathError as exc:
        raise SourceSpecError(f"{where}: {exc}") from exc


def _check_strings(value: Any, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(item, str) and item for item in values):
        raise SourceSpecError(f"{where} must be a non-empty text or list of texts")


def _check_extract_flag(entry: Mapping[str, Any], where: str) -> None:
    if not isinstance(entry.get("extract", True), bool):
        raise SourceSpecError(f"{where}: extract must be true or false")


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
