"""Plain text, Markdown and source code: decoded carefully, kept with line numbers."""

from __future__ import annotations

import re

from .base import Document, ParseError, Section

CODE_EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp",
    ".hpp": "cpp", ".hh": "cpp", ".rs": "rust", ".go": "go", ".java": "java", ".js": "js", ".mjs": "js",
    ".cjs": "js", ".jsx": "js", ".ts": "ts", ".tsx": "ts", ".rb": "ruby", ".php": "php", ".cs": "csharp",
    ".kt": "kotlin", ".kts": "kotlin", ".swift": "swift", ".sh": "shell", ".bash": "shell", ".zsh": "shell",
    ".sql": "sql", ".html": "html", ".htm": "html", ".css": "css", ".scss": "css", ".json": "json",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".scala": "scala", ".lua": "lua", ".pl": "perl",
    ".r": "r", ".m": "objective-c", ".ex": "elixir", ".exs": "elixir", ".hs": "haskell", ".proto": "proto",
    ".sol": "solidity", ".xml": "xml", ".ini": "ini", ".cfg": "ini", ".dockerfile": "docker", ".tf": "hcl",
    ".vue": "html", ".svelte": "html", ".dart": "dart", ".jl": "julia", ".zig": "zig",
}
PROSE_EXTENSIONS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
                    ".rst": "text", ".log": "text", ".csv": "text", ".tsv": "text"}
SHEBANGS = {"python": "python", "bash": "shell", "sh": "shell", "node": "js", "ruby": "ruby", "perl": "perl"}
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def decode(data: bytes) -> str:
    """UTF-8 (with or without BOM) or UTF-16 with a BOM; anything binary is refused."""
    if not data.strip():
        raise ParseError("the file is empty")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise ParseError("the file says it is UTF-16 but is not") from None
    sample = data[:65536]
    if b"\x00" in sample:
        raise ParseError("this looks like a binary file, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    controls = sum(1 for ch in text[:65536] if ord(ch) < 32 and ch not in "\n\r\t\f")
    if controls > len(text[:65536]) * 0.01:
        raise ParseError("this looks like a binary file, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def language_of(filename: str, text: str) -> str | None:
    lower = filename.lower()
    for ext, language in CODE_EXTENSIONS.items():
        if lower.endswith(ext):
            return language
    if lower.rsplit("/", 1)[-1] in ("dockerfile", "makefile"):
        return "docker" if "docker" in lower else "make"
    first = text.split("\n", 1)[0]
    if first.startswith("#!"):
        for word, language in SHEBANGS.items():
            if word in first:
                return language
    return None


def parse_text(filename: str, data: bytes) -> Document:
    text = decode(data)
    if not text.strip():
        raise ParseError("the file is empty")
    language = language_of(filename, text)
    if language:
        return Document("code", [Section(text, first_line=1)], language=language)
    kind = "markdown" if filename.lower().endswith((".md", ".markdown")) else "text"
    return Document(kind, _markdown_sections(text) if kind == "markdown" else [Section(text, first_line=1)])


def _markdown_sections(text: str) -> list[Section]:
    """Split Markdown at headings so each passage knows its heading and first line."""
    sections, heading, start, lines = [], None, 1, []
    for number, line in enumerate(text.split("\n"), 1):
        match = _HEADING.match(line)
        if match and lines:
            sections.append(Section("\n".join(lines), heading=heading, first_line=start))
            lines, start = [], number
        if match:
            heading = match.group(2)
        lines.append(line)
    if lines:
        sections.append(Section("\n".join(lines), heading=heading, first_line=start))
    return [s for s in sections if s.text.strip()]
