"""The one DICOM attribute the pipeline needs without opening the slide: the slide's name.

NCI Imaging Data Commons names DICOM whole-slide images by series UUID (the folder the `idc`
source writes), but the paper names tiles after the original slide. A WSI DICOM file carries
that name as ContainerIdentifier (0040,0512), the barcode/label of the slide, e.g.
`C3L-00004-21` in CPTAC. `container_identifier` reads it from the top-level data set by walking
the elements of an Explicit VR Little Endian file (what every WSI transfer syntax uses) up to
the tag, skipping values and nested sequences by their lengths, so pixel data is never read.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

CONTAINER_IDENTIFIER = (0x0040, 0x0512)
_HEADER_BYTES = 8 << 20
"""How much of the file is read: the tag sorts before the bulky optical-path and pixel data."""
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})  # fmt: skip
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
"""Usable as a slide stem: no path separators, and no dots (stems end at the first dot)."""


class _Truncated(Exception):
    """The element runs past the bytes read."""


def container_identifier(path: Path) -> str | None:
    """The slide's ContainerIdentifier, or None when the file has none, is not a readable
    Explicit VR Little Endian DICOM file, or the value is not usable as a file name."""
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(_HEADER_BYTES)
    except OSError:
        return None
    if data[128:132] != b"DICM":
        return None
    try:
        meta_end, transfer_syntax = _file_meta(data)
        if transfer_syntax == _IMPLICIT_VR_LITTLE_ENDIAN:
            return None
        raw = _find(data, meta_end, CONTAINER_IDENTIFIER)
    except (_Truncated, struct.error):
        return None
    if raw is None:
        return None
    value = raw.decode("ascii", errors="replace").strip(" \x00")
    return value if _SAFE_NAME.fullmatch(value) else None


def _file_meta(data: bytes) -> tuple[int, str]:
    """End offset of the file meta group (0002) and its transfer syntax UID."""
    position, syntax = 132, ""
    while position + 8 <= len(data):
        group, element, length, header = _element_header(data, position)
        if group != 0x0002:
            return position, syntax
        if element == 0x0010:
            syntax = (
                data[position + header : position + header + length].decode("ascii").strip(" \x00")
            )
        position += header + length
    raise _Truncated


def _find(data: bytes, position: int, tag: tuple[int, int]) -> bytes | None:
    """The value of `tag` among the top-level elements from `position`; None when a later tag
    (or the end of the data set) is reached first."""
    while position + 8 <= len(data):
        group, element, length, header = _element_header(data, position)
        if (group, element) == tag:
            if position + header + length > len(data):
                raise _Truncated
            return data[position + header : position + header + length]
        if (group, element) > tag:
            return None
        position += header
        position = _skip_undefined(data, position) if length == _UNDEFINED else position + length
    return None


def _element_header(data: bytes, position: int) -> tuple[int, int, int, int]:
    """(group, element, value length, header size) of the element at `position`."""
    group, element = struct.unpack_from("<HH", data, position)
    if group == 0xFFFE:  # item and delimiter tags carry no VR
        return group, element, struct.unpack_from("<I", data, position + 4)[0], 8
    if data[position + 4 : position + 6] in _LONG_VRS:
        return group, element, struct.unpack_from("<I", data, position + 8)[0], 12
    return group, element, struct.unpack_from("<H", data, position + 6)[0], 8


def _skip_undefined(data: bytes, position: int) -> int:
    """The offset after an undefined-length value (a sequence of items, or encapsulated
    fragments) that starts at `position`."""
    while position + 8 <= len(data):
        group, element, length, header = _element_header(data, position)
        position += header
        if (group, element) == _SEQUENCE_END:
            return position
        if (group, element) == _ITEM and length == _UNDEFINED:
            position = _skip_item(data, position)
        elif length != _UNDEFINED:
            position += length
        else:
            position = _skip_undefined(data, position)
    raise _Truncated


def _skip_item(data: bytes, position: int) -> int:
    """The offset after an undefined-length item's elements and its delimiter."""
    while position + 8 <= len(data):
        group, element, length, header = _element_header(data, position)
        position += header
        if (group, element) == _ITEM_END:
            return position
        position = _skip_undefined(data, position) if length == _UNDEFINED else position + length
    raise _Truncated
