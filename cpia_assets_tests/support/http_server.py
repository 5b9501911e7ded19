"""A real HTTP server on 127.0.0.1 for download tests, with fault injection and fake APIs.

`FakeServer` (a context manager) serves registered bytes with Range support and can misbehave on
purpose: answer an error status N times, drop the connection or stall mid-body, ignore Range,
redirect.
It also imitates the JSON shapes of the GDC files/data endpoints, Zenodo's records endpoint,
figshare's articles endpoint and IDC's manifest-preview endpoint plus its S3 bucket, so sources
whose `api_url` points here run the real download code. Every request is logged in `requests`.

`write_server_catalog` publishes a small WSI and ROI sub-dataset on a server and writes a catalog
YAML whose sources point at it, for end-to-end runs of the pipeline.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import yaml
from PIL import Image

from cpia_assets_tests.support.paths import TESTDATA

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Served:
    """Bytes at one URL path and how to misbehave when asked for them."""

    data: bytes
    fail_first: int = 0  # answer `status` to this many requests first
    status: int = 500
    drop_first: int = 0  # then cut this many responses after `drop_after` body bytes
    drop_after: int = 0
    stall_first: int = 0  # then pause this many responses for `stall_s` after `drop_after` bytes
    stall_s: float = 0.0
    ranges: bool = True  # False: ignore Range headers and always send everything
    etag: str | None = None
    redirect_to: str | None = None  # answer 302 to this path instead


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    headers: Mapping[str, str]


@dataclass
class _Api:
    gdc_files: list[dict[str, Any]] = field(default_factory=list)
    zenodo: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figshare: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    idc_rows: list[dict[str, Any]] = field(default_factory=list)


class FakeServer:
    """ThreadingHTTPServer on 127.0.0.1:<free port>; use as `with FakeServer() as server:`."""

    def __init__(self, *, gdc_token: str | None = None, idc_page_size: int = 2) -> None:
        self.gdc_token = gdc_token  # when set, GDC data requests need this X-Auth-Token
        self.idc_page_size = idc_page_size  # small pages exercise nextPage
        self.files: dict[str, Served] = {}
        self.requests: list[LoggedRequest] = []
        self.idc_selection: list[dict[str, Any]] = []  # rows of the last manifest preview
        self.api = _Api()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def gdc_api(self) -> str:
        return f"{self.url}/gdc"

    @property
    def zenodo_api(self) -> str:
        return f"{self.url}/zenodo"

    @property
    def figshare_api(self) -> str:
        return f"{self.url}/figshare"

    @property
    def idc_api(self) -> str:
        return f"{self.url}/idc"

    @property
    def storage_url(self) -> str:
        return f"{self.url}/s3"

    def serve(self, path: str, data: bytes, **behaviour: Any) -> str:
        """Serve `data` at `path` (e.g. '/files/a.zip'); returns its full URL."""
        with self._lock:
            self.files[path] = Served(data, **behaviour)
        return self.url + path

    def hits(self, path: str, method: str = "GET") -> int:
        """How many requests reached `path` (a prefix ending in '*' matches many)."""
        prefix = path.endswith("*")
        return sum(
            1
            for r in self.requests
            if r.method == method and (r.path.startswith(path[:-1]) if prefix else r.path == path)
        )

    def add_gdc_slide(
        self,
        project_id: str,
        file_name: str,
        data: bytes,
        *,
        strategy: str = "Diagnostic Slide",
        md5: str | None = None,
        **behaviour: Any,
    ) -> str:
        """A slide in the fake GDC; `md5` overrides the published checksum. Returns file_id."""
        file_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{project_id}/{file_name}"))
        self.api.gdc_files.append(
            {
                "file_id": file_id,
                "file_name": file_name,
                "md5sum": md5 or hashlib.md5(data).hexdigest(),
                "file_size": len(data),
                "project_id": project_id,
                "experimental_strategy": strategy,
            }
        )
        self.serve(f"/gdc/data/{file_id}", data, **behaviour)
        return file_id

    def add_zenodo_record(self, record: int, files: Mapping[str, bytes], **behaviour: Any) -> None:
        entries = []
        for name, data in files.items():
            url = self.serve(f"/zenodo/records/{record}/files/{name}/content", data, **behaviour)
            entries.append(
                {
                    "key": name,
                    "size": len(data),
                    "checksum": f"md5:{hashlib.md5(data).hexdigest()}",
                    "links": {"self": url},
                }
            )
        self.api.zenodo[str(record)] = entries

    def add_figshare_article(self, article: int, files: Mapping[str, bytes]) -> None:
        entries = []
        for index, (name, data) in enumerate(files.items()):
            url = self.serve(f"/figshare/files/{article}/{index}", data)
            entries.append(
                {
                    "id": index,
                    "name": name,
                    "size": len(data),
                    "computed_md5": hashlib.md5(data).hexdigest(),
                    "download_url": url,
                }
            )
        self.api.figshare[str(article)] = entries

    def add_idc_series(
        self, collection_id: str, instances: Sequence[bytes], *, modality: str = "SM"
    ) -> str:
        """One DICOM series of an IDC collection, served from the fake S3 bucket with ETags."""
        series = str(uuid.uuid4())
        for data in instances:
            instance = str(uuid.uuid4())
            key = f"idc-open-data/{series}/{instance}.dcm"
            self.serve(f"/s3/{key}", data, etag=f'"{hashlib.md5(data).hexdigest()}"')
            self.api.idc_rows.append(
                {
                    "collection_id": collection_id,
                    "Modality": modality,
                    "crdc_series_uuid": series,
                    "crdc_instance_uuid": instance,
                    "aws_url": f"s3://{key}",
                }
            )
        return series


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `FakeServer.requests` instead."""

    @property
    def fake(self) -> FakeServer:
        return self.server.fake  # type: ignore[attr-defined]

    def _log(self) -> None:
        with self.fake._lock:
            self.fake.requests.append(
                LoggedRequest(self.command, self.path.split("?")[0], dict(self.headers.items()))
            )

    def do_GET(self) -> None:
        self._log()
        parsed = urlparse(self.path)
        path = parsed.path
        if match := re.fullmatch(r"/zenodo/records/(\d+)", path):
            self._zenodo(match.group(1))
        elif match := re.fullmatch(r"/figshare/articles/(\d+)", path):
            self._figshare(match.group(1))
        elif path == "/idc/cohorts/manifest/preview/nextPage":
            query = parse_qs(parsed.query)
            self._idc_page(int(query["next_page"][0]))
        else:
            self._file(path)

    def do_POST(self) -> None:
        self._log()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/gdc/files":
            self._gdc_files(body)
        elif self.path == "/idc/cohorts/manifest/preview":
            self._idc_preview(body)
        else:
            self._json({"message": "not found"}, status=404)

    def _json(self, document: Any, status: int = 200) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _gdc_files(self, body: Mapping[str, Any]) -> None:
        wanted = {
            c["content"]["field"]: set(c["content"]["value"]) for c in body["filters"]["content"]
        }
        hits = [
            {key: f[key] for key in body["fields"].split(",")}
            for f in self.fake.api.gdc_files
            if f["project_id"] in wanted["cases.project.project_id"]
            and f["experimental_strategy"] in wanted["experimental_strategy"]
            and "Slide Image" in wanted["data_type"]
        ]
        start, size = int(body["from"]), int(body["size"])
        page = hits[start : start + size]
        pagination = {"count": len(page), "total": len(hits), "from": start, "size": size}
        self._json({"data": {"hits": page, "pagination": pagination}, "warnings": {}})

    def _zenodo(self, record: str) -> None:
        if record not in self.fake.api.zenodo:
            self._json({"status": 404, "message": "PID does not exist."}, status=404)
            return
        self._json({"id": int(record), "files": self.fake.api.zenodo[record]})

    def _figshare(self, article: str) -> None:
        self._json({"id": int(article), "files": self.fake.api.figshare.get(article, [])})

    def _idc_preview(self, body: Mapping[str, Any]) -> None:
        filters = body["cohort_def"]["filters"]
        self.fake.idc_selection = [
            {key: row[key] for key in body["fields"]}
            for row in self.fake.api.idc_rows
            if row["collection_id"] in filters["collection_id"]
            and row["Modality"] in filters["Modality"]
        ]
        self._idc_page(0)

    def _idc_page(self, start: int) -> None:
        rows = self.fake.idc_selection
        end = start + self.fake.idc_page_size
        self._json(
            {
                "manifest": {"manifest_data": rows[start:end], "totalFound": len(rows)},
                "next_page": str(end) if end < len(rows) else None,
            }
        )

    def _file(self, path: str) -> None:
        fake = self.fake
        with fake._lock:
            served = fake.files.get(path)
            if served is None:
                return self._json({"message": f"no file at {path}"}, status=404)
            failing = served.fail_first > 0
            dropping = not failing and served.drop_first > 0
            stalling = not (failing or dropping) and served.stall_first > 0
            if failing:
                served.fail_first -= 1
            elif dropping:
                served.drop_first -= 1
            elif stalling:
                served.stall_first -= 1
        token_missing = self.headers.get("X-Auth-Token") != fake.gdc_token
        if path.startswith("/gdc/data/") and fake.gdc_token and token_missing:
            return self._json({"message": "token required"}, status=403)
        if failing:
            return self._json({"message": "injected failure"}, status=served.status)
        if served.redirect_to:
            self.send_response(302)
            self.send_header("Location", fake.url + served.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self._send_bytes(served, dropping=dropping, stalling=stalling)
        return None

    def _send_bytes(self, served: Served, *, dropping: bool, stalling: bool) -> None:
        data, start = served.data, 0
        match = _RANGE.match(self.headers.get("Range", "")) if served.ranges else None
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if served.etag:
            self.send_header("ETag", served.etag)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if dropping:
            self.wfile.write(body[: served.drop_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if stalling:
            self.wfile.write(body[: served.drop_after])
            self.wfile.flush()
            time.sleep(served.stall_s)
            body = body[served.drop_after :]
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up on a stalled response
            self.close_connection = True


def png_bytes(seed: int, size: int = 64) -> bytes:
    """A small random RGB PNG (deterministic per seed)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(members: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def write_server_catalog(
    path: Path,
    server: FakeServer,
    *,
    slides: Sequence[Path] = (TESTDATA / "CMU-1-Small-Region.svs",),
    roi_classes: Sequence[str] = ("lymphocyte", "neutrophil"),
    roi_per_split: Mapping[str, int] | None = None,
) -> Path:
    """Publish a WSI sub-dataset (fake GDC) and a ROI one (fake Zenodo) and catalog them.

    The ROI images are PNGs in `<split>/<class>/` folders of a zip in Zenodo record 4242.
    Returns `path`, a catalog YAML loadable with `load_catalog(path)`.
    """
    for slide in slides:
        server.add_gdc_slide("TCGA-SRV", slide.name, slide.read_bytes())
    per_split = roi_per_split or {"train": 3, "val": 1, "test": 1}
    names = [
        f"{split}/{label}/{label}_{split}_{index}.png"
        for split, count in per_split.items()
        for label in roi_classes
        for index in range(count)
    ]
    members = {name: png_bytes(seed) for seed, name in enumerate(names)}
    server.add_zenodo_record(4242, {"cells.zip": zip_bytes(members)})
    catalog = {
        "subdatasets": [
            {
                "key": "srv-wsi",
                "name": "Served WSI",
                "kind": "wsi",
                "organ": "colon",
                "source": {
                    "type": "gdc",
                    "project_id": "TCGA-SRV",
                    "experimental_strategies": ["Diagnostic Slide"],
                    "api_url": server.gdc_api,
                },
            },
            {
                "key": "srv-roi",
                "name": "Served ROI",
                "kind": "roi",
                "organ": "blood",
                "scale": "S",
                "labelled": True,
                "labels": {"from": "parent_folder", "level": 1},
                "splits": {"from": "parent_folder", "level": 2},
                "source": {"type": "zenodo", "record": 4242, "api_url": server.zenodo_api},
            },
        ]
    }
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path
