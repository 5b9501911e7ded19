"""`load_catalog`: a catalog file read, validated strictly and cached.

A catalog is a public interface, so it is validated strictly on load: duplicate YAML keys are
errors, every entry goes through its pydantic model (`model.py`) and its `source:` block through
`sources.py`, and every problem reads "<file>: entry '<key>' (#n): field '<path>': <reason>",
all of them at once.

A file is parsed once per process while it is unchanged (same modification time and size), so
definition loads and steps share one parse; treat the returned catalog as read-only. Across
processes (each run and step loads the definitions again), `load_catalog(..., cache_dir=)` keeps
the validated entries as JSON (`cache.py`).
"""

from __future__ import annotations

from collections.abc import Hashable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cpia_assets.core.catalog.cache import CatalogCache, FileVersion
from cpia_assets.core.catalog.fields import CatalogError
from cpia_assets.core.catalog.model import Catalog, SubDataset
from cpia_assets.core.catalog.sources import did_you_mean
from cpia_assets.core.catalog.validation import EntryError, entry_label, parse_entry

BUILTIN_CATALOGS = {"cpia": "cpia.yaml", "demo": "demo.yaml"}
MAX_REPORTED_PROBLEMS = 20


def resolve_catalog_path(spec: str | Path | None) -> Path:
    """`demo`/`cpia` name a built-in catalog; anything else is a file path. Default: full CPIA."""
    spec = str(spec) if spec else "cpia"
    if spec in BUILTIN_CATALOGS:
        return Path(str(resources.files("cpia_assets") / "catalogs" / BUILTIN_CATALOGS[spec]))
    try:
        path = Path(spec).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise CatalogError(f"catalog file {spec}: cannot resolve the path: {exc}") from exc
    if not path.is_file():
        raise CatalogError(f"catalog file {path} does not exist (CPIA_CATALOG={spec!r})")
    return path


def load_catalog(spec: str | Path | None = None, *, cache_dir: Path | None = None) -> Catalog:
    """The validated catalog `spec` names (see `resolve_catalog_path`), parsed once per process.

    With `cache_dir`, the validated entries are also kept there for other processes (see
    `CatalogCache`); a stale or unreadable cache is ignored and rewritten.
    """
    path = resolve_catalog_path(spec)
    try:
        stat = path.stat()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc.strerror}") from exc
    return _load(FileVersion(path, stat.st_size, stat.st_mtime_ns), cache_dir)


@lru_cache(maxsize=16)
def _load(version: FileVersion, cache_dir: Path | None) -> Catalog:
    cache = CatalogCache(cache_dir, version) if cache_dir else None
    entries = cache.read() if cache else None
    if entries is None:
        entries = _validated_entries(version.path)
        if cache:
            cache.write(entries)
    return Catalog(path=version.path, subdatasets=_with_local_paths(entries, version.path))


def _validated_entries(path: Path) -> list[SubDataset]:
    """Parse and validate every entry of a catalog file; raises naming all problems at once."""
    entries: list[SubDataset] = []
    problems: list[str] = []
    first_of_key: dict[str, int] = {}
    for number, raw in enumerate(_read_entries(path), 1):
        where = entry_label(raw, number)
        try:
            entry = parse_entry(raw)
        except EntryError as exc:
            problems += [f"{path}: {where}: {problem}" for problem in exc.problems]
            continue
        if entry.key in first_of_key:
            problems.append(
                f"{path}: {where}: field 'key': duplicate key {entry.key!r} "
                f"(entry #{first_of_key[entry.key]} has it too)"
            )
        first_of_key.setdefault(entry.key, number)
        entries.append(entry)
    _raise_problems(path, problems)
    return entries


def _with_local_paths(entries: list[SubDataset], path: Path) -> tuple[SubDataset, ...]:
    """Entries whose local source path is resolved against the catalog file's folder, so a
    catalog travels with its data. Done on every load: the links it follows may change."""
    resolved: list[SubDataset] = []
    problems: list[str] = []
    for number, entry in enumerate(entries, 1):
        if entry.source["type"] != "local":
            resolved.append(entry)
            continue
        given = entry.source["path"]
        try:
            local = str((path.parent / Path(given).expanduser()).resolve())
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            problems.append(
                f"{path}: entry {entry.key!r} (#{number}): field 'source.path': "
                f"cannot resolve {given!r}: {exc}"
            )
            continue
        resolved.append(entry.model_copy(update={"source": {**entry.source, "path": local}}))
    _raise_problems(path, problems)
    return tuple(resolved)


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"{path}: ... and {len(problems) - len(shown)} more problems")
        raise CatalogError("\n".join(shown))


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """Valid YAML, but a key given twice: YAML would silently keep the last value."""


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster


class _CatalogLoader(_SafeLoader):
    """The safe loader (libyaml's where PyYAML has it) refusing a key given twice in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merges may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # refused by the base class with its own message
            if key in first_seen:
                raise _DuplicateKeyError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first_seen[key].line + 1})",
                    key_node.start_mark,
                )
            first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_entries(path: Path) -> list[Any]:
    """The raw `subdatasets:` list of a catalog file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from exc
    try:
        document = yaml.load(text, Loader=_CatalogLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = (
            exc.problem if isinstance(exc, _DuplicateKeyError) else f"not valid YAML: {exc.problem}"
        )
        raise CatalogError(f"{path}: {where}{problem}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("subdatasets"), list):
        raise CatalogError(f"{path}: expected a top-level 'subdatasets:' list")
    unknown = [name for name in document if name != "subdatasets"]
    if unknown:
        raise CatalogError(
            f"{path}: unknown top-level field {unknown[0]!r}"
            f"{did_you_mean(unknown[0], ['subdatasets'])}"
        )
    if not document["subdatasets"]:
        raise CatalogError(f"{path}: the 'subdatasets:' list is empty")
    return document["subdatasets"]
