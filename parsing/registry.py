"""Which parser reads which file: by extension first, then by the file's own first bytes."""

from __future__ import annotations

from .base import Document, ParseError
from .docx import parse_docx
from .pdf import parse_pdf
from .text import CODE_EXTENSIONS, PROSE_EXTENSIONS, parse_text

SUPPORTED = sorted({".pdf", ".docx", *CODE_EXTENSIONS, *PROSE_EXTENSIONS})


def detect(filename: str, head: bytes) -> str:
    """'pdf', 'docx' or 'text' (text covers prose and code)."""
    lower = filename.lower()
    if lower.endswith(".pdf") or head.startswith(b"%PDF"):
        return "pdf"
    if lower.endswith(".docx") or (head.startswith(b"PK\x03\x04") and lower.endswith(".docx")):
        return "docx"
    if lower.endswith((".doc", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".zip", ".png", ".jpg", ".jpeg",
                       ".gif", ".exe", ".bin")):
        raise ParseError(f"files like '{filename}' are not supported; use pdf, docx, text or code "
                         f"({', '.join(SUPPORTED[:12])}, ...)")
    return "text"


def parse_file(filename: str, data: bytes) -> Document:
    if not data:
        raise ParseError("the file is empty")
    kind = detect(filename, data[:8])
    if kind == "pdf":
        return parse_pdf(filename, data)
    if kind == "docx":
        return parse_docx(filename, data)
    return parse_text(filename, data)
