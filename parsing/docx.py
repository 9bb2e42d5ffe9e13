"""Word documents with python-docx: paragraphs and tables in order, under their headings.

Before python-docx sees the file, the zip is checked: too much uncompressed data or an extreme
compression ratio is a zip bomb, and every XML part is read in full with defusedxml, so a part
that declares a DTD or entities anywhere (the "billion laughs", external entities) is refused.
"""

from __future__ import annotations

import io
import zipfile
import zlib

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

from .base import Document, ParseError, Section

MAX_UNCOMPRESSED = 200 * 2**20
MAX_RATIO = 200


def check_zip(data: bytes) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ParseError("this is not a valid .docx file (it is not a zip archive)") from None
    with archive:
        members = archive.infolist()
        total = sum(m.file_size for m in members)
        if total > MAX_UNCOMPRESSED:
            raise ParseError(f"the document unpacks to {total / 2**20:.0f} MB (a zip bomb?); the limit is "
                             f"{MAX_UNCOMPRESSED / 2**20:.0f} MB")
        for member in members:
            if member.file_size > 1_000_000 and member.file_size > MAX_RATIO * max(1, member.compress_size):
                raise ParseError(f"'{member.filename}' is compressed {member.file_size // max(1, member.compress_size)}"
                                 " times (a zip bomb?); refused")
        if "word/document.xml" not in archive.namelist():
            raise ParseError("this zip is not a Word document (no word/document.xml)")
        for member in members:
            if member.filename.endswith((".xml", ".rels")):
                check_xml(archive, member)


def check_xml(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    try:
        with archive.open(member) as handle:
            for _, element in safe_xml.iterparse(handle, forbid_dtd=True, forbid_entities=True, forbid_external=True):
                element.clear()
    except DefusedXmlException:
        raise ParseError("the document declares XML entities or a DTD (an XML entity bomb?); refused") from None
    except safe_xml.ParseError:
        raise ParseError(f"the .docx file is damaged ('{member.filename[:100]}' is not well-formed XML)") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError):
        raise ParseError(f"the .docx file is damaged ('{member.filename[:100]}' cannot be unpacked)") from None


def parse_docx(filename: str, data: bytes) -> Document:
    check_zip(data)
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:
        raise ParseError(f"the .docx file is damaged ({type(exc).__name__})") from None
    sections: list[Section] = []
    heading, lines = None, []

    def flush() -> None:
        if lines and "\n".join(lines).strip():
            sections.append(Section("\n".join(lines), heading=heading))

    for block in document.element.body.iterchildren():
        tag = block.tag.rsplit("}", 1)[-1]
        if tag == "p":
            paragraph = Paragraph(block, document)
            style = (paragraph.style.name if paragraph.style is not None else "") or ""
            text = paragraph.text.strip()
            if style.startswith(("Heading", "Title")) and text:
                flush()
                heading, lines = text, [text]
            elif text:
                lines.append(text)
        elif tag == "tbl":
            table = Table(block, document)
            for row in table.rows:
                cells = [cell.text.strip() for cell in row.cells]
                if any(cells):
                    lines.append(" | ".join(cells))
    flush()
    if not sections:
        raise ParseError("the document has no text")
    return Document("docx", sections)
