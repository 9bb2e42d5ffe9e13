"""Bytes in, text and structure out: pdf (pages), docx (headings, tables), text and code (lines,
language). One parser per format behind `accepts`/`parse`; `parse_file` picks one, and
`parse_isolated` runs it in a separate process under a time and memory bound so a hostile file
cannot hang or exhaust the server. Knows nothing about embeddings, sessions or torch."""

from .base import Document, ParseError, Section
from .registry import detect, parse_file
from .sandbox import ParseLimits, parse_isolated

__all__ = ["Document", "ParseError", "Section", "detect", "parse_file", "ParseLimits", "parse_isolated"]
