"""Safe extraction of zip and tar archives into a sub-dataset's folder.

Everything is first written to a private staging folder, member by member, while each member is
checked: absolute paths, '..', device files and FIFOs are refused, symlinks must stay inside the
archive's folder (checked again after all are created, which catches chains of links), hardlinks
must name an earlier regular file, and the expanded size may not pass a bound (zip bombs). Only
a fully clean archive is moved into place, so a rejected one leaves nothing behind. Before the
move, every member's final path and every link's destination are resolved through the links
already in the target folder (other archives of the source may have put them there): an archive
that is harmless alone cannot chain through them to write outside the folder.
macOS clutter (`__MACOSX/` folders, `._*` resource forks) is checked like the rest but not kept.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cpia_assets.core.downloads.errors import FileFetchError, UnsafeArchiveError
from cpia_assets.core.fsutil import UnsafePathError, safe_relative

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
_MAX_LINK_TEXT = 4096
_CHUNK = 1 << 20
_MAX_LINK_HOPS = 40  # as the kernel's bound on links followed in one path
_PLACING = threading.Lock()
"""Held from checking an archive's final paths against the target to moving it in, so that an
archive extracted in parallel cannot add links between the check and the move."""


@dataclass(frozen=True)
class ExtractedFile:
    rel_path: str  # relative to the extraction folder
    member: str  # the name inside the archive
    bytes: int
    sha256: str


@dataclass(frozen=True)
class _Member:
    name: str  # as stored
    kind: str  # file | dir | symlink | hardlink
    size: int
    link: str = ""  # symlink text or hardlink target


def archive_stem(name: str) -> str | None:
    """The name without its archive suffix, or None when `name` is not an archive."""
    lowered = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def extract_archive(
    archive: Path, target: Path, *, label: str, max_bytes: int, staging_parent: Path
) -> list[ExtractedFile]:
    """Extract `archive` into `target`; raise UnsafeArchiveError (nothing written) if unsafe.

    `label` names the archive in errors; `staging_parent` must be on the same file system as
    `target` so members are moved, not copied.
    """
    staging_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="extract-", dir=staging_parent))
    try:
        try:
            with _members(archive) as members:
                staged = _Stager(staging, label=label, max_bytes=max_bytes)
                for member, read in members:
                    staged.add(member, read)
                extracted = staged.finish()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise FileFetchError(label, f"not a readable archive: {exc}") from exc
        with _PLACING:
            _check_placement(target, extracted, staged)
            _move_into(staging, target, extracted, staged.links)
        return extracted
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _members(archive: Path) -> Iterator[Iterator[tuple[_Member, IO[bytes] | None]]]:
    """(member, open stream or None) pairs of a zip or tar archive, in archive order."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            yield ((member, _zip_stream(zipped, info, member)) for info in zipped.infolist()
                   for member in [_zip_member(zipped, info)])  # fmt: skip
        return
    with tarfile.open(archive, mode="r:*") as tarred:
        yield ((member, tarred.extractfile(info) if member.kind == "file" else None)
               for info in tarred for member in [_tar_member(info)])  # fmt: skip


def _zip_member(zipped: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    mode = info.external_attr >> 16
    if info.is_dir():
        return _Member(info.filename, "dir", 0)
    if stat.S_ISLNK(mode):
        if info.file_size > _MAX_LINK_TEXT:
            return _Member(info.filename, "special", 0)
        return _Member(info.filename, "symlink", 0, zipped.read(info).decode("utf-8", "replace"))
    if stat.S_IFMT(mode) == 0 or stat.S_ISREG(mode):  # no file type: made on Windows, ...
        return _Member(info.filename, "file", info.file_size)
    return _Member(info.filename, "special", 0)


def _zip_stream(
    zipped: zipfile.ZipFile, info: zipfile.ZipInfo, member: _Member
) -> IO[bytes] | None:
    return zipped.open(info) if member.kind == "file" else None


def _tar_member(info: tarfile.TarInfo) -> _Member:
    if info.isreg():
        return _Member(info.name, "file", info.size)
    if info.isdir():
        return _Member(info.name, "dir", 0)
    if info.issym():
        return _Member(info.name, "symlink", 0, info.linkname)
    if info.islnk():
        return _Member(info.name, "hardlink", 0, info.linkname)
    return _Member(info.name, "special", 0)  # character/block devices, FIFOs, ...


class _Stager:
    """Writes checked members into the staging folder; links come last."""

    def __init__(self, root: Path, *, label: str, max_bytes: int) -> None:
        self.root, self.label, self.max_bytes = root, label, max_bytes
        self.written = 0
        self.files: dict[str, ExtractedFile] = {}
        self.links: list[tuple[str, str, str]] = []  # (rel path, link text, member name)

    def refuse(self, member: _Member, reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            self.label, f"unsafe archive, nothing extracted: member {member.name!r} {reason}"
        )

    def add(self, member: _Member, stream: IO[bytes] | None) -> None:
        if member.kind == "special":
            raise self.refuse(member, "is a device file, FIFO or other special file")
        try:
            rel = safe_relative(member.name)
        except UnsafePathError as exc:
            if member.kind == "dir" and member.name.strip("./") == "":
                return  # the archive's own root folder entry
            raise self.refuse(member, f"has an unsafe path: {exc}") from exc
        if _is_clutter(rel):
            return
        if member.kind == "dir":
            (self.root / rel).mkdir(parents=True, exist_ok=True)
        elif member.kind == "symlink":
            self._check_symlink(member, rel)
            self.links.append((rel, member.link, member.name))
        elif member.kind == "hardlink":
            self._link_hard(member, rel)
        else:
            assert stream is not None
            with stream:
                self._write(member, rel, stream)

    def _write(self, member: _Member, rel: str, stream: IO[bytes]) -> None:
        if self.written + member.size > self.max_bytes:
            raise self.refuse(member, f"takes the expansion past {self.max_bytes} bytes")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with path.open("wb") as out:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if self.written + size > self.max_bytes:
                    raise self.refuse(member, f"takes the expansion past {self.max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        self.written += size
        self.files[rel] = ExtractedFile(rel, member.name, size, digest.hexdigest())

    def _check_symlink(self, member: _Member, rel: str) -> None:
        text = member.link.replace("\\", "/")
        if not text or text.startswith("/") or "\x00" in text:
            raise self.refuse(member, f"is a link to {member.link!r} outside the archive")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), text))
        if resolved == ".." or resolved.startswith("../"):
            raise self.refuse(member, f"is a link to {member.link!r} outside the archive")

    def _link_hard(self, member: _Member, rel: str) -> None:
        try:
            target = safe_relative(member.link)
        except UnsafePathError as exc:
            raise self.refuse(member, f"is a hard link outside the archive: {exc}") from exc
        if target not in self.files:
            raise self.refuse(member, f"is a hard link to {member.link!r}, not an earlier file")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(self.root / target, path)
        self.files[rel] = ExtractedFile(rel, member.name, *_size_and_hash(self.files[target]))

    def finish(self) -> list[ExtractedFile]:
        """Create the symlinks, then prove each resolves inside the folder (chains included)."""
        root = Path(os.path.realpath(self.root))
        for rel, text, name in self.links:
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                raise self.refuse(_Member(name, "symlink", 0), "collides with another member")
            path.symlink_to(text)
        for rel, text, name in self.links:
            real = Path(os.path.realpath(self.root / rel))
            if real != root and root not in real.parents:
                raise self.refuse(_Member(name, "symlink", 0), f"resolves outside via {text!r}")
            target = real.relative_to(root).as_posix() if real != root else ""
            if target in self.files:  # a link to a file is a file of the source too
                self.files[rel] = ExtractedFile(rel, name, *_size_and_hash(self.files[target]))
        return sorted(self.files.values(), key=lambda f: f.rel_path)


def _is_clutter(rel: str) -> bool:
    parts = rel.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def _size_and_hash(extracted: ExtractedFile) -> tuple[int, str]:
    return extracted.bytes, extracted.sha256


def _move_order(names: set[str]) -> list[str]:
    return sorted(names, key=lambda rel: (rel.count("/"), rel))


def _check_placement(target: Path, extracted: list[ExtractedFile], staged: _Stager) -> None:
    """Refuse the archive when a member would land outside `target` or a link would point out
    of it, resolving paths through the links already on disk and the archive's own links, in
    the order `_move_into` places them."""
    members = {f.rel_path: f.member for f in extracted} | {rel: n for rel, _, n in staged.links}
    texts = {rel: text for rel, text, _ in staged.links}
    placed: dict[str, str | None] = {}  # final path under target -> link text (None: a file)
    final_links: dict[str, str] = {}  # final path -> the link member's path in the archive
    for rel in _move_order(set(members)):
        parent = _resolve_inside(target, posixpath.dirname(rel), placed)
        if parent is None:
            reason = "would be written outside the folder through a link already there"
            raise staged.refuse(_Member(members[rel], "file", 0), reason)
        final = posixpath.join(parent, posixpath.basename(rel))
        placed[final] = texts.get(rel)
        if rel in texts:
            final_links[final] = rel
    for final, rel in final_links.items():
        destination = posixpath.join(posixpath.dirname(final), texts[rel])
        if _resolve_inside(target, destination, placed) is None:
            reason = f"resolves outside via {texts[rel]!r} with the links already in the folder"
            raise staged.refuse(_Member(members[rel], "symlink", 0), reason)


def _resolve_inside(target: Path, rel: str, placed: Mapping[str, str | None]) -> str | None:
    """`rel` (a path under `target`) with every link followed, the archive's about-to-be-placed
    entries (`placed`) taking precedence over what is on disk; None when it leaves `target`,
    goes through an absolute link or loops."""
    pending = rel.split("/")[::-1]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return None
            resolved.pop()
            continue
        here = "/".join([*resolved, part])
        text = placed[here] if here in placed else _link_on_disk(target / here)
        if text is None:
            resolved.append(part)
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS or text.startswith("/"):
            return None
        pending.extend(text.split("/")[::-1])
    return "/".join(resolved)


def _link_on_disk(path: Path) -> str | None:
    return path.readlink().as_posix() if path.is_symlink() else None


def _move_into(
    staging: Path, target: Path, extracted: list[ExtractedFile], links: list[tuple[str, str, str]]
) -> None:
    """Move staged files and links into `target`, replacing earlier copies of the same paths."""
    names = {f.rel_path for f in extracted} | {rel for rel, _, _ in links}
    for rel in _move_order(names):
        final = target / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir() and not final.is_symlink():
            raise UnsafeArchiveError(rel, f"{final} is a folder; the archive has a file there")
        (staging / rel).replace(final)
