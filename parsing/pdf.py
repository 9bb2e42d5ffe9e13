"""PDF with pypdf: text per page, so answers can cite page numbers."""

from __future__ import annotations

import io

from .base import Document, ParseError, Section

MAX_PAGES = 3000


def parse_pdf(filename: str, data: bytes) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError, PdfStreamError

    if not data.startswith(b"%PDF"):
        raise ParseError("this is not a PDF file (no %PDF header)")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ParseError("the PDF is encrypted (password protected); remove the password and upload it again")
        count = len(reader.pages)
        if count > MAX_PAGES:
            raise ParseError(f"the PDF has {count} pages; at most {MAX_PAGES} are read")
        sections = []
        for number, page in enumerate(reader.pages, 1):
            text = (page.extract_text() or "").strip()
            if text:
                sections.append(Section(text, page=number))
    except ParseError:
        raise
    except (PdfReadError, PdfStreamError, ValueError, KeyError, TypeError, RecursionError, OSError) as exc:
        raise ParseError(f"the PDF is damaged and cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    except Exception as exc:  # pypdf raises many kinds on hostile input
        if "encrypt" in str(exc).lower() or "crypt" in type(exc).__name__.lower():
            raise ParseError("the PDF is encrypted in a way Shoal cannot open") from None
        raise ParseError(f"the PDF cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not sections:
        raise ParseError("no text found in the PDF (a scanned PDF needs OCR, which Shoal does not do)")
    return Document("pdf", sections, pages=count)
