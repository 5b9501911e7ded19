"""File listings of remote sources: explicit http lists and the GDC, IDC, Zenodo and figshare APIs.

Each `list_*` function turns a validated spec into the RemoteFiles to fetch. Base URLs come from
the spec's `api_url` (tests point it at 127.0.0.1).
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from cpia_assets.core.catalog.sources import (
    FIGSHARE_API,
    GDC_API,
    GDC_STRATEGIES,
    IDC_API,
    IDC_STORAGE,
    ZENODO_API,
)
from cpia_assets.core.downloads.archives import archive_stem
from cpia_assets.core.downloads.errors import ListingError
from cpia_assets.core.downloads.http import HttpClient, HttpStatusError, RemoteFile, TransientError
from cpia_assets.core.fsutil import UnsafePathError, safe_relative

T = TypeVar("T")
_GDC_FIELDS = "file_id,file_name,md5sum,file_size"
_IDC_FIELDS = ["crdc_series_uuid", "crdc_instance_uuid", "aws_url"]


def list_http(spec: Mapping[str, Any]) -> list[RemoteFile]:
    files = []
    for entry in spec["files"]:
        rel = entry.get("path") or _url_name(entry["url"])
        files.append(
            _remote(
                entry["url"],
                rel,
                sha256=entry.get("sha256"),
                md5=entry.get("md5"),
                size=entry.get("size"),
                extract=entry.get("extract", True),
                extract_to=entry.get("extract_to"),
            )
        )
    return _unique(files, "http source")


def list_gdc(spec: Mapping[str, Any], client: HttpClient, page_size: int) -> list[RemoteFile]:
    """Slide images of GDC projects (files endpoint, paged with from/size); md5 and size known."""
    api = str(spec.get("api_url", GDC_API)).rstrip("/")
    projects = _as_list(spec["project_id"])
    filters = {
        "op": "and",
        "content": [
            _gdc_in("cases.project.project_id", projects),
            _gdc_in("data_type", ["Slide Image"]),
            _gdc_in("experimental_strategy", spec.get("experimental_strategies", GDC_STRATEGIES)),
        ],
    }
    hits: list[Mapping[str, Any]] = []
    where = f"GDC files endpoint {api}/files (projects {projects})"
    while True:
        body = {
            "filters": filters,
            "fields": _GDC_FIELDS,
            "format": "json",
            "size": page_size,
            "from": len(hits),
        }
        data = _field(_call(where, partial(client.post_json, f"{api}/files", body)), "data", where)
        page = _field(data, "hits", where)
        hits.extend(page)
        total = _field(_field(data, "pagination", where), "total", where)
        if not page or len(hits) >= int(total):
            break
    if not hits:
        raise ListingError(f"{where}: no slide images found; check project_id and strategies")
    names = Counter(hit["file_name"] for hit in hits)
    return _unique(
        [
            _remote(
                f"{api}/data/{hit['file_id']}",
                _gdc_path(hit, repeated=names[hit["file_name"]] > 1),
                md5=hit.get("md5sum"),
                size=hit.get("file_size"),
                extract=False,
            )
            for hit in hits
        ],
        where,
    )


def list_idc(spec: Mapping[str, Any], client: HttpClient, page_size: int) -> list[RemoteFile]:
    """DICOM instances of IDC collections (API v2 manifest preview), from IDC's public S3 bucket.

    Files land as `<crdc_series_uuid>/<crdc_instance_uuid>.dcm`: one folder per slide, which is
    how OpenSlide opens a DICOM whole-slide image (named after its ContainerIdentifier, see
    `slides.slide_stem`). S3's ETag is the MD5 of single-part objects.
    """
    api = str(spec.get("api_url", IDC_API)).rstrip("/")
    storage = str(spec.get("storage_url", IDC_STORAGE)).rstrip("/")
    collections = _as_list(spec["collection_id"])
    filters = {"collection_id": collections, "Modality": _as_list(spec.get("modalities", "SM"))}
    body = {
        "cohort_def": {"name": "cpia", "description": "CPIA raw_download", "filters": filters},
        "fields": _IDC_FIELDS,
        "page_size": page_size,
    }
    where = f"IDC manifest endpoint {api} (collections {collections})"
    answer = _call(where, lambda: client.post_json(f"{api}/cohorts/manifest/preview", body))
    rows = list(_field(_field(answer, "manifest", where), "manifest_data", where))
    while answer.get("next_page"):
        params = {"next_page": answer["next_page"], "page_size": page_size}
        next_url = f"{api}/cohorts/manifest/preview/nextPage"
        answer = _call(where, partial(client.get_json, next_url, params=params))
        rows.extend(_field(_field(answer, "manifest", where), "manifest_data", where))
    if not rows:
        raise ListingError(f"{where}: no instances of modality {filters['Modality']} found")
    files = []
    for row in rows:
        bucket_and_key = str(_field(row, "aws_url", where)).removeprefix("s3://")
        rel = f"{row['crdc_series_uuid']}/{row['crdc_instance_uuid']}.dcm"
        files.append(_remote(f"{storage}/{bucket_and_key}", rel, extract=False, etag_md5=True))
    return _unique(files, where)


def list_zenodo(spec: Mapping[str, Any], client: HttpClient) -> list[RemoteFile]:
    """Files of a Zenodo record (records API): name, size, 'md5:<hex>' checksum, download link."""
    api = str(spec.get("api_url", ZENODO_API)).rstrip("/")
    record = spec["record"]
    where = f"Zenodo record {record} ({api}/records/{record})"
    answer = _call(where, lambda: client.get_json(f"{api}/records/{record}"))
    entries = _field(answer, "files", where)
    if isinstance(entries, Mapping):  # newer serialisations nest them under "entries"
        entries = list(_field(entries, "entries", where).values())
    files = []
    for entry in entries:
        name = entry.get("key") or _field(entry, "filename", where)
        links = entry.get("links", {})
        url = (
            links.get("self")
            or links.get("download")
            or f"{api}/records/{record}/files/{name}/content"
        )
        checksum = str(entry.get("checksum", ""))
        is_md5 = checksum.startswith("md5:") or len(checksum) == 32
        md5 = checksum.removeprefix("md5:") if is_md5 else None
        files.append(
            _remote(
                url,
                name,
                md5=md5,
                size=entry.get("size", entry.get("filesize")),
                extract=spec.get("extract", True),
            )
        )
    return _select(files, spec.get("files"), where)


def list_figshare(spec: Mapping[str, Any], client: HttpClient) -> list[RemoteFile]:
    """Files of a figshare article (API v2): name, size, computed md5, download_url."""
    api = str(spec.get("api_url", FIGSHARE_API)).rstrip("/")
    article = spec["article"]
    where = f"figshare article {article} ({api}/articles/{article})"
    answer = _call(where, lambda: client.get_json(f"{api}/articles/{article}"))
    files = [
        _remote(
            _field(entry, "download_url", where),
            _field(entry, "name", where),
            md5=entry.get("computed_md5") or entry.get("supplied_md5") or None,
            size=entry.get("size"),
            extract=spec.get("extract", True),
        )
        for entry in _field(answer, "files", where)
    ]
    return _select(files, spec.get("files"), where)


def _remote(url: str, rel_path: str, *, extract: bool, **checks: Any) -> RemoteFile:
    """A RemoteFile with a safe path; archives extract into a folder named after them."""
    extract_to = checks.pop("extract_to", None)
    try:
        rel = safe_relative(rel_path)
    except UnsafePathError as exc:
        raise ListingError(f"{url}: {exc}") from exc
    stem = archive_stem(posixpath.basename(rel)) if extract else None
    if stem is None:
        return RemoteFile(url=url, rel_path=rel, **checks)
    folder = extract_to if extract_to is not None else posixpath.join(posixpath.dirname(rel), stem)
    return RemoteFile(
        url=url,
        rel_path=rel,
        extract=True,
        extract_to="" if folder in ("", ".") else safe_relative(folder),
        **checks,
    )


def _select(files: list[RemoteFile], wanted: Any, where: str) -> list[RemoteFile]:
    files = _unique(files, where)
    if wanted is None:
        return files
    wanted = _as_list(wanted)
    missing = sorted(set(wanted) - {f.rel_path for f in files})
    if missing:
        raise ListingError(
            f"{where} has no file(s) {missing}; it has {sorted(f.rel_path for f in files)}"
        )
    return [f for f in files if f.rel_path in wanted]


def _unique(files: list[RemoteFile], where: str) -> list[RemoteFile]:
    repeated = sorted(name for name, n in Counter(f.rel_path for f in files).items() if n > 1)
    if repeated:
        raise ListingError(f"{where}: several files would land at {repeated}")
    return files


def _call(where: str, request: Callable[[], T]) -> T:
    try:
        return request()
    except (HttpStatusError, TransientError) as exc:
        raise ListingError(f"{where}: {exc}") from exc


def _field(document: Any, name: str, where: str) -> Any:
    if not isinstance(document, Mapping) or name not in document:
        raise ListingError(f"{where}: unexpected answer, no {name!r} field")
    return document[name]


def _gdc_path(hit: Mapping[str, Any], *, repeated: bool) -> str:
    """Slide names are unique in TCGA; a repeated name gets its file id as a folder."""
    return f"{hit['file_id']}/{hit['file_name']}" if repeated else str(hit["file_name"])


def _gdc_in(field: str, values: Any) -> dict[str, Any]:
    return {"op": "in", "content": {"field": field, "value": list(values)}}


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _url_name(url: str) -> str:
    return unquote(posixpath.basename(urlparse(url).path))
