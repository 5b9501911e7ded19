"""The cells of an .xlsx workbook's first sheet as text, with the standard library only.

Label tables of some sources (SICAPv2's partitions) are Excel workbooks, and the environment has
no Excel reader. An .xlsx file is a zip of XML parts (ECMA-376): the workbook lists its sheets,
its relationships part names each sheet's file, and text cells usually point into a shared
string table. Numbers are kept as written (`1`, `0.5`), booleans as `1`/`0`; formulas give
their cached value. Rows are padded so that each cell sits under its column letter.
"""

from __future__ import annotations

import posixpath
import zipfile
from pathlib import Path
from xml.etree import ElementTree

_MAIN = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_RELATIONSHIP_ID = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id"
_PACKAGE_RELATIONSHIP = "{http://schemas.openxmlformats.org/package/2006/relationships}"


class XlsxError(ValueError):
    """A file that is not a readable .xlsx workbook (names the part and the reason)."""


def xlsx_rows(path: Path) -> list[list[str]]:
    """The rows of the workbook's first sheet, each a list of cell texts ('' for empty cells)."""
    try:
        with zipfile.ZipFile(path) as workbook:
            shared = _shared_strings(workbook)
            sheet = ElementTree.fromstring(workbook.read(_first_sheet_part(workbook)))
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError) as exc:
        raise XlsxError(f"not a readable .xlsx workbook: {exc}") from exc
    rows = []
    for row in sheet.iter(f"{_MAIN}row"):
        cells: list[str] = []
        for cell in row.iter(f"{_MAIN}c"):
            column = _column_index(cell.get("r", "")) if cell.get("r") else len(cells)
            cells += [""] * (column - len(cells))
            cells.append(_cell_text(cell, shared))
        rows.append(cells)
    return rows


def _first_sheet_part(workbook: zipfile.ZipFile) -> str:
    book = ElementTree.fromstring(workbook.read("xl/workbook.xml"))
    sheet = next(book.iter(f"{_MAIN}sheet"), None)
    if sheet is None:
        raise XlsxError("the workbook has no sheet")
    relations = ElementTree.fromstring(workbook.read("xl/_rels/workbook.xml.rels"))
    for relation in relations.iter(f"{_PACKAGE_RELATIONSHIP}Relationship"):
        if relation.get("Id") == sheet.get(_RELATIONSHIP_ID):
            target = relation.get("Target", "")
            return target.lstrip("/") if target.startswith("/") else posixpath.join("xl", target)
    raise XlsxError(f"the workbook names no file for sheet {sheet.get('name')!r}")


def _shared_strings(workbook: zipfile.ZipFile) -> list[str]:
    if "xl/sharedStrings.xml" not in workbook.namelist():
        return []
    table = ElementTree.fromstring(workbook.read("xl/sharedStrings.xml"))
    return ["".join(t.text or "" for t in item.iter(f"{_MAIN}t")) for item in table]


def _cell_text(cell: ElementTree.Element, shared: list[str]) -> str:
    kind = cell.get("t", "n")
    if kind == "inlineStr":
        return "".join(t.text or "" for t in cell.iter(f"{_MAIN}t"))
    value = cell.findtext(f"{_MAIN}v") or ""
    if kind == "s" and value:
        index = int(value) if value.isdigit() else -1
        if not 0 <= index < len(shared):
            raise XlsxError(f"cell {cell.get('r')} names no shared string ({value!r})")
        return shared[index]
    return value


def _column_index(reference: str) -> int:
    """0-based column of a cell reference such as 'C12' (A = 0, Z = 25, AA = 26)."""
    index = 0
    for letter in reference:
        if not letter.isalpha():
            break
        index = index * 26 + ord(letter.upper()) - ord("A") + 1
    return index - 1
