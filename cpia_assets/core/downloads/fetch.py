"""`fetch_source`: bring every file of one sub-dataset's source into its raw folder, verified.

Remote files stream into `.cpia_partial/` and are renamed into place only after their size and
checksum match; archives are extracted safely; every file gets a RAW_FILES row. Files of one
source are fetched by a bounded thread pool; a file that fails is recorded and its siblings go
on; at the end the source fails listing every failed file, keeping the good ones for the rerun.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from cpia_assets.core.catalog.sources import validate_source
from cpia_assets.core.downloads import apis
from cpia_assets.core.downloads.archives import extract_archive
from cpia_assets.core.downloads.errors import (
    FileFetchError,
    IntegrityError,
    ManualDownloadRequired,
    SourceIncomplete,
)
from cpia_assets.core.downloads.http import HttpClient, RemoteFile, has_checksum, verify_file
from cpia_assets.core.downloads.local import bring_local, list_local
from cpia_assets.core.downloads.paths import ARCHIVE_DIR, PARTIAL_DIR
from cpia_assets.core.downloads.settings import DownloadSettings
from cpia_assets.core.downloads.state import (
    ArchiveEntry,
    DownloadState,
    FileEntry,
    listing_key,
    remove_dropped,
)
from cpia_assets.core.fsutil import FolderWalk, sha256_file, walk_visible
from cpia_assets.core.parallel import map_unordered
from cpia_assets.core.stage import failure

STAGE = "raw_download"
_SAVE_EVERY_S = 10.0
Item = TypeVar("Item")
Log = Callable[[str], None]


def fetch_source(
    source: Mapping[str, Any],
    dest: Path,
    *,
    settings: DownloadSettings,
    env: Mapping[str, str] = os.environ,
    progress: Log | None = None,
) -> list[dict[str, Any]]:
    """Bring every file of `source` into `dest`; return RAW_FILES rows of all files present.

    Raises ManualDownloadRequired for an empty manual source, SourceIncomplete when some files
    failed (after the others finished), and other SourceError subclasses for unusable sources.
    """
    spec = validate_source(source)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    log = progress or (lambda message: None)
    state = DownloadState.load(dest)
    kind = spec["type"]
    if kind == "manual":
        found = _manual_files(spec, dest)
        entries = _record_present([rel for _, rel in found.files], spec["landing_page"], state, log)
        if found.refused:
            raise SourceIncomplete(
                f"manual source of {dest}", _refusals(found), [e.row() for e in entries]
            )
    elif kind == "synthetic":
        from cpia_assets.core.synthetic import generate_source  # pyvips: import only when used

        made = sorted(path.relative_to(dest).as_posix() for path in generate_source(spec, dest))
        entries = _record_present(made, f"synthetic:{spec['recipe']}", state, log)
    elif kind == "local":
        mode = spec.get("mode", settings.local_mode)
        bring = partial(bring_local, dest=dest, state=state, mode=mode)
        listing = list_local(spec["path"])
        entries = _run(
            listing.files,
            lambda item: [bring(*item)],
            name=lambda item: item[1],
            paths=lambda item: [item[1]],
            state=state,
            settings=settings,
            source=f"local source {spec['path']} of {dest}",
            refused=_refusals(listing),
        )
    else:
        entries = _fetch_remote(spec, dest, state, settings, env, log)
    return [entry.row() for entry in sorted(entries, key=lambda e: e.rel_path)]


def source_data_version(rows: Iterable[Mapping[str, Any]]) -> str:
    """A digest of (path, sha256) pairs: it changes only when the files really change."""
    digest = hashlib.sha256()
    for rel_path, sha256 in sorted((row["rel_path"], row["sha256"]) for row in rows):
        digest.update(f"{rel_path}\t{sha256}\n".encode())
    return digest.hexdigest()


def _manual_files(spec: Mapping[str, Any], dest: Path) -> FolderWalk:
    """The files a person put in `dest`; none yet means the person has work to do."""
    found = walk_visible(dest)
    if not found.files and not found.refused:
        raise ManualDownloadRequired(
            name=f"sub-dataset {dest.name!r}",
            landing_page=spec["landing_page"],
            instructions=spec.get("instructions", ""),
            dest=str(dest),
        )
    return found


def _refusals(listing: FolderWalk) -> list[dict[str, str]]:
    """FAILURES rows for the entries a folder walk refused (bad names, looping links)."""
    return [failure(rel_path, STAGE, reason) for rel_path, reason in listing.refused]


def _record_present(
    found: list[str], source: str, state: DownloadState, log: Log
) -> list[FileEntry]:
    """Record files already in place (never deleted by us); unchanged ones are not re-hashed."""
    entries, new = [], 0
    for rel in found:
        entry = state.current(rel, source)
        if entry is None:
            entry = state.record(
                rel, sha256=sha256_file(state.dest / rel), source=source, owned=False
            )
            new += 1
        entries.append(entry)
    log(f"{len(found)} files in {state.dest} ({new} new or changed, hashed)")
    state.forget_except(found)
    state.save()
    return entries


@dataclass(frozen=True)
class _Remote:
    """What the per-file workers of one remote source share."""

    dest: Path
    state: DownloadState
    client: HttpClient
    settings: DownloadSettings
    log: Log

    def partial(self, rel_path: str) -> Path:
        return self.dest / PARTIAL_DIR / f"{rel_path}.part"

    def bring(self, remote: RemoteFile) -> list[FileEntry]:
        if remote.extract:
            return self._bring_archive(remote)
        entry = self.state.current(remote.rel_path, remote.url)
        if entry is not None:
            return [entry]
        final = self.dest / remote.rel_path
        sha256 = self._verified_copy(remote, final)
        if sha256 is None:
            part = self.partial(remote.rel_path)
            sha256 = self.client.download(remote, part)
            final.parent.mkdir(parents=True, exist_ok=True)
            part.replace(final)
            self.log(f"{remote.rel_path}: done, verified")
        return [self.state.record(remote.rel_path, sha256=sha256, source=remote.url)]

    def _verified_copy(self, remote: RemoteFile, path: Path) -> str | None:
        """The sha256 of a file already at `path` that matches the published checksum."""
        if not (path.is_file() and has_checksum(remote)):
            return None
        try:
            sha256 = verify_file(remote, path)
        except IntegrityError:
            self.log(f"{remote.rel_path}: the copy on disk does not match; downloading again")
            return None
        self.log(f"{remote.rel_path}: found on disk, checksum matches")
        return sha256

    def _bring_archive(self, remote: RemoteFile) -> list[FileEntry]:
        done = self.state.archives.get(remote.rel_path)
        if done is not None and done.source == remote.url:
            members = [self.state.files.get(rel) for rel in done.members]
            if all(m is not None and m.is_current(self.dest) for m in members):
                return [m for m in members if m is not None]
        kept = self.dest / ARCHIVE_DIR / remote.rel_path
        sha256 = self._verified_copy(remote, kept)
        archive = kept
        if sha256 is None:
            archive = self.partial(remote.rel_path)
            sha256 = self.client.download(remote, archive)
        size = archive.stat().st_size
        self.log(f"{remote.rel_path}: verified; extracting into {remote.extract_to or '.'}/")
        try:
            extracted = extract_archive(
                archive,
                self.dest / remote.extract_to,
                label=remote.rel_path,
                max_bytes=self.settings.max_extracted_bytes,
                staging_parent=self.dest / PARTIAL_DIR,
            )
        except FileFetchError:
            archive.unlink()  # verified but unusable: a new download would be the same
            raise
        entries = [
            self.state.record(
                posixpath.join(remote.extract_to, f.rel_path) if remote.extract_to else f.rel_path,
                sha256=f.sha256,
                source=f"{remote.url}!/{f.member}",
            )
            for f in extracted
        ]
        members = tuple(e.rel_path for e in entries)
        self.state.record_archive(remote.rel_path, ArchiveEntry(sha256, size, remote.url, members))
        if self.settings.keep_archives and archive != kept:
            kept.parent.mkdir(parents=True, exist_ok=True)
            archive.replace(kept)
        elif not self.settings.keep_archives:
            archive.unlink()
        self.log(f"{remote.rel_path}: {len(entries)} files extracted")
        return entries

    def paths_of(self, remote: RemoteFile) -> list[str]:
        """Paths a remote file owns in `dest` (an archive's members from its last extraction)."""
        done = self.state.archives.get(remote.rel_path)
        return [remote.rel_path, *(done.members if done is not None else ())]


def _fetch_remote(
    spec: Mapping[str, Any],
    dest: Path,
    state: DownloadState,
    settings: DownloadSettings,
    env: Mapping[str, str],
    log: Log,
) -> list[FileEntry]:
    client = HttpClient(settings, credentials=_credentials(spec, env), log=log)
    remote = _Remote(dest=dest, state=state, client=client, settings=settings, log=log)
    entries = _run(
        _listing(spec, state, client, settings, log),
        remote.bring,
        name=lambda item: item.rel_path,
        paths=remote.paths_of,
        state=state,
        settings=settings,
        source=f"{spec['type']} source of {dest}",
        archives=True,
    )
    shutil.rmtree(dest / PARTIAL_DIR, ignore_errors=True)  # only reached when all files are in
    return entries


def _listing(
    spec: Mapping[str, Any],
    state: DownloadState,
    client: HttpClient,
    settings: DownloadSettings,
    log: Log,
) -> list[RemoteFile]:
    """The source's files; an API's answer is saved so a rerun makes no request at all."""
    if spec["type"] == "http":
        return apis.list_http(spec)
    key = listing_key(spec)
    if state.listing_key == key and state.listing and not settings.refresh_listings:
        log(f"{spec['type']} source: using the file list saved by the previous run")
        return [RemoteFile(**item) for item in state.listing]
    if spec["type"] == "gdc":
        files = apis.list_gdc(spec, client, settings.page_size)
    elif spec["type"] == "idc":
        files = apis.list_idc(spec, client, settings.page_size)
    elif spec["type"] == "zenodo":
        files = apis.list_zenodo(spec, client)
    else:
        files = apis.list_figshare(spec, client)
    log(f"{spec['type']} source: {len(files)} files listed")
    state.listing_key, state.listing = key, [asdict(f) for f in files]
    state.save()
    return files


def _credentials(spec: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Request headers carrying the token named by `token_env` (absent: anonymous access)."""
    variable = spec.get("token_env")
    token = env.get(variable, "") if variable else ""
    if not token:
        return {}
    if spec["type"] == "gdc":
        return {"X-Auth-Token": token}
    return {"Authorization": f"Bearer {token}"}


def _run(
    items: list[Item],
    bring: Callable[[Item], list[FileEntry]],
    *,
    name: Callable[[Item], str],
    paths: Callable[[Item], list[str]],
    state: DownloadState,
    settings: DownloadSettings,
    source: str,
    archives: bool = False,
    refused: Iterable[dict[str, str]] = (),
) -> list[FileEntry]:
    """Bring every item with bounded threads; record failures (after the `refused` ones found
    while listing); drop files no longer listed."""
    entries: list[FileEntry] = []
    failures: list[dict[str, str]] = list(refused)
    kept_paths: set[str] = set()
    guarded = partial(_guarded, bring, name)
    try:
        saved_at = time.monotonic()
        with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
            for item, produced, failed in map_unordered(guarded, items, pool):
                entries.extend(produced)
                if failed is not None:
                    failures.append(failed)
                    kept_paths.update(paths(item))  # not deleted: the rerun may reuse them
                if time.monotonic() - saved_at > _SAVE_EVERY_S:  # progress survives a kill
                    state.save()
                    saved_at = time.monotonic()
        kept_paths.update(entry.rel_path for entry in entries)
        listed_archives = [name(item) for item in items] if archives else []
        remove_dropped(state.dest, state.forget_except(kept_paths, listed_archives))
    finally:
        state.save()
    if failures:
        raise SourceIncomplete(source, failures, [entry.row() for entry in entries])
    return entries


def _guarded(
    bring: Callable[[Item], list[FileEntry]], name: Callable[[Item], str], item: Item
) -> tuple[Item, list[FileEntry], dict[str, str] | None]:
    """Run one item; a failure becomes a FAILURES row instead of stopping its siblings."""
    try:
        return item, bring(item), None
    except FileFetchError as exc:
        return item, [], failure(exc.rel_path, STAGE, exc.reason)
    except OSError as exc:
        return item, [], failure(name(item), STAGE, f"{type(exc).__name__}: {exc}")
