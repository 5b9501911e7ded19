"""Small .xlsx workbooks written in tests, as Excel lays them out: text in the shared string
table, numbers inline, the first sheet stored under a part name other than sheet1.xml."""

from __future__ import annotations

import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_RELATIONSHIPS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"


def write_xlsx(path: Path, rows: list[list[str | int | float | None]]) -> Path:
    """Write `rows` as the first sheet of a workbook (None = an empty cell, left out)."""
    strings: list[str] = []
    sheet_rows = []
    for number, row in enumerate(rows, start=1):
        cells = []
        for column, value in enumerate(row):
            reference = f"{chr(ord('A') + column)}{number}"
            if value is None:
                continue
            if isinstance(value, str):
                strings.append(value)
                cells.append(f'<c r="{reference}" t="s"><v>{len(strings) - 1}</v></c>')
            else:
                cells.append(f'<c r="{reference}"><v>{value}</v></c>')
        sheet_rows.append(f'<row r="{number}">{"".join(cells)}</row>')
    shared = "".join(f"<si><t>{escape(text)}</t></si>" for text in strings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as workbook:
        workbook.writestr(
            "xl/workbook.xml",
            f'<workbook xmlns="{_MAIN}" xmlns:r="{_RELATIONSHIPS}"><sheets>'
            '<sheet name="Sheet1" sheetId="1" r:id="rId7"/>'
            '<sheet name="Other" sheetId="2" r:id="rId1"/></sheets></workbook>',
        )
        workbook.writestr(
            "xl/_rels/workbook.xml.rels",
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Target="worksheets/sheet1.xml"/>'
            '<Relationship Id="rId7" Target="worksheets/sheet2.xml"/></Relationships>',
        )
        workbook.writestr("xl/sharedStrings.xml", f'<sst xmlns="{_MAIN}">{shared}</sst>')
        workbook.writestr(
            "xl/worksheets/sheet2.xml",
            f'<worksheet xmlns="{_MAIN}"><sheetData>{"".join(sheet_rows)}</sheetData></worksheet>',
        )
        workbook.writestr(
            "xl/worksheets/sheet1.xml",
            f'<worksheet xmlns="{_MAIN}"><sheetData><row r="1"><c r="A1" t="inlineStr"><is>'
            "<t>not the first sheet</t></is></c></row></sheetData></worksheet>",
        )
    return path
