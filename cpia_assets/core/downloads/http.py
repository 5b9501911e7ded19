"""HTTP transfers: JSON API calls and file downloads that resume, retry and verify.

Only the standard library is used. Credentials travel as "unredirected" headers, so a redirect
to another host (a signed storage URL) never receives them, and they are never logged.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode

from cpia_assets.core.downloads.errors import FileFetchError, IntegrityError, ListingError
from cpia_assets.core.downloads.settings import DownloadSettings

T = TypeVar("T")
Log = Callable[[str], None]

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_PLAIN_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')
_MIB = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch. `rel_path` is where it lands under the source folder."""

    url: str
    rel_path: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    extract: bool = False  # an archive whose members land in `extract_to`
    extract_to: str = ""
    etag_md5: bool = False  # the server's ETag is the MD5 unless it is a multipart ETag (S3)

    def describe_size(self) -> str:
        return f"{self.size / _MIB:.1f} MiB" if self.size is not None else "unknown size"


class TransientError(Exception):
    """A failure worth retrying: 5xx, 429, timeouts, dropped connections."""


class HttpStatusError(Exception):
    """A final HTTP error status (404, 403, ...)."""

    def __init__(self, url: str, status: int) -> None:
        self.url = url
        self.status = status
        super().__init__(f"HTTP {status} from {url}")


class HttpClient:
    """Retrying JSON calls and resumable downloads with the settings' timeouts and backoff."""

    def __init__(
        self,
        settings: DownloadSettings,
        *,
        credentials: Mapping[str, str] | None = None,
        log: Log = lambda message: None,
    ) -> None:
        self.settings = settings
        self._credentials = dict(credentials or {})
        self._log = log
        self._opener = urllib.request.build_opener()

    def get_json(self, url: str, *, params: Mapping[str, Any] | None = None) -> Any:
        full = f"{url}?{urlencode(params)}" if params else url
        return self._retrying(full, lambda: self._read_json(self._request(full)))

    def post_json(self, url: str, body: Mapping[str, Any]) -> Any:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        return self._retrying(url, lambda: self._read_json(self._request(url, data, headers)))

    def download(self, remote: RemoteFile, part: Path) -> str:
        """Bring `remote` into `part` (resuming what is there), verify it, return its sha256.

        A failed verification deletes `part`. Raises FileFetchError naming `remote.rel_path`.
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        label = remote.rel_path
        failures = 0
        while True:
            before = _size(part)
            try:
                etag = self._transfer(remote, part)
                break
            except TransientError as exc:
                # Attempts that brought new bytes do not count: a flaky link still finishes.
                failures = 0 if _size(part) > before else failures + 1
                if failures > self.settings.retries:
                    raise FileFetchError(
                        label, f"gave up after {self.settings.retries} retries: {exc}"
                    ) from exc
                self._log(f"{label}: {exc}; retrying in {self._wait(failures):.1f}s")
                time.sleep(self._wait(failures))
            except HttpStatusError as exc:
                raise FileFetchError(label, _explain(exc, self._credentials)) from exc
        return verify_file(remote, part, etag=etag)

    def _transfer(self, remote: RemoteFile, part: Path) -> str | None:
        """One attempt: request the missing bytes and append them; returns the ETag."""
        offset = _size(part)
        if remote.size is not None and offset > remote.size:
            part.unlink()
            offset = 0
        if offset and offset == remote.size:
            return None  # complete from an earlier attempt
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = self._open(self._request(remote.url, headers=headers))
        except HttpStatusError as exc:
            if exc.status == 416 and offset:
                part.unlink()
                raise TransientError("the server refused to resume; starting over") from exc
            raise
        with response:
            total, offset = self._start(response, remote, part, offset)
            meter = _Meter(remote.rel_path, total, self._log)
            received = offset
            try:
                with part.open("ab" if offset else "wb") as out:
                    while chunk := response.read(self.settings.chunk_bytes):
                        out.write(chunk)
                        received += len(chunk)
                        meter.update(received)
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"connection lost after {received} bytes ({exc})") from exc
            if total is not None and received < total:
                raise TransientError(f"connection dropped after {received} of {total} bytes")
            return response.headers.get("ETag")

    def _start(
        self, response: http.client.HTTPResponse, remote: RemoteFile, part: Path, offset: int
    ) -> tuple[int | None, int]:
        """Check a response against the requested range: (expected total, real offset)."""
        if offset and response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink()
                raise TransientError("the server answered another byte range; starting over")
            self._log(f"{remote.rel_path}: resuming at byte {offset}")
            return (int(match.group(3)) if match.group(3) != "*" else remote.size), offset
        length = response.headers.get("Content-Length")
        self._log(f"{remote.rel_path}: downloading {remote.describe_size()} from {remote.url}")
        return (int(length) if length and length.isdigit() else remote.size), 0

    def _request(
        self, url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> urllib.request.Request:
        request = urllib.request.Request(
            url, data=data, headers={"User-Agent": self.settings.user_agent, **(headers or {})}
        )
        for name, value in self._credentials.items():
            request.add_unredirected_header(name, value)
        return request

    def _open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        url = request.full_url
        try:
            return self._opener.open(request, timeout=self.settings.timeout_s)
        except HTTPError as exc:
            exc.close()
            if exc.code in RETRY_STATUSES:
                raise TransientError(f"HTTP {exc.code} from {url}") from None
            raise HttpStatusError(url, exc.code) from None
        except (URLError, OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{url}: {getattr(exc, 'reason', exc)}") from exc

    def _read_json(self, request: urllib.request.Request) -> Any:
        with self._open(request) as response:
            try:
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"{request.full_url}: connection lost ({exc})") from exc
        try:
            return json.loads(payload)
        except ValueError as exc:
            raise ListingError(f"{request.full_url} did not answer with JSON") from exc

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        failures = 0
        while True:
            try:
                return attempt()
            except TransientError as exc:
                failures += 1
                if failures > self.settings.retries:
                    raise
                self._log(f"{what}: {exc}; retrying in {self._wait(failures):.1f}s")
                time.sleep(self._wait(failures))

    def _wait(self, failures: int) -> float:
        return min(self.settings.backoff_s * 2 ** max(failures - 1, 0), self.settings.max_backoff_s)


def verify_file(remote: RemoteFile, path: Path, *, etag: str | None = None) -> str:
    """Check size and checksums of a fetched file; on a mismatch delete it and raise."""
    problem = None
    actual_size = path.stat().st_size
    plain_etag = _PLAIN_MD5_ETAG.match(etag or "") if remote.etag_md5 else None
    expected_md5 = remote.md5 or (plain_etag.group(1) if plain_etag else None)
    sha256, md5 = file_digests(path, with_md5=expected_md5 is not None)
    if remote.size is not None and actual_size != remote.size:
        problem = f"size is {actual_size} bytes, expected {remote.size}"
    elif remote.sha256 and sha256 != remote.sha256.lower():
        problem = f"sha256 is {sha256}, expected {remote.sha256.lower()}"
    elif expected_md5 and md5 != expected_md5.lower():
        problem = f"md5 is {md5}, expected {expected_md5.lower()}"
    if problem:
        path.unlink()
        raise IntegrityError(remote.rel_path, f"{problem} (from {remote.url}); download deleted")
    return sha256


def has_checksum(remote: RemoteFile) -> bool:
    return bool(remote.sha256 or remote.md5)


def file_digests(path: Path, *, with_md5: bool) -> tuple[str, str | None]:
    """sha256 (always) and md5 (on request) of a file in one read."""
    sha256 = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
    with path.open("rb") as handle:
        while chunk := handle.read(_MIB):
            sha256.update(chunk)
            if md5 is not None:
                md5.update(chunk)
    return sha256.hexdigest(), (md5.hexdigest() if md5 is not None else None)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _explain(exc: HttpStatusError, credentials: Mapping[str, str]) -> str:
    if exc.status in (401, 403):
        hint = (
            "the access token was refused"
            if credentials
            else "access needs a token: set the variable named by the source's token_env"
        )
        return f"{exc}; {hint}"
    return str(exc)


class _Meter:
    """Logs a file's progress every 10% (or every 256 MiB when the size is unknown)."""

    def __init__(self, label: str, total: int | None, log: Log) -> None:
        self.label, self.total, self.log = label, total, log
        self.step = max(total // 10, 1) if total else 256 * _MIB
        self.next = self.step

    def update(self, received: int) -> None:
        if received < self.next:
            return
        done = f"{received / _MIB:.1f} MiB"
        if self.total:
            done += f" of {self.total / _MIB:.1f} MiB ({100 * received // self.total}%)"
        self.log(f"{self.label}: {done}")
        self.next = (received // self.step + 1) * self.step
