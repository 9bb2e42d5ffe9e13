"""Cutting parsed documents into overlapping passages that remember where they came from.

Prose goes through langchain's recursive splitter; code through its language-aware splitter
(functions and classes stay whole where they fit). Every chunk keeps its page, heading or line
range, so an answer can cite "report.pdf, page 3" or "main.py, lines 10-42".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from parsing import Document

CHUNK_CHARS = 800
OVERLAP_CHARS = 120
_LANGUAGES = {"python": Language.PYTHON, "js": Language.JS, "ts": Language.TS, "go": Language.GO,
              "rust": Language.RUST, "java": Language.JAVA, "cpp": Language.CPP, "c": Language.C,
              "csharp": Language.CSHARP, "kotlin": Language.KOTLIN, "swift": Language.SWIFT,
              "ruby": Language.RUBY, "php": Language.PHP, "scala": Language.SCALA, "lua": Language.LUA,
              "html": Language.HTML, "markdown": Language.MARKDOWN, "haskell": Language.HASKELL,
              "elixir": Language.ELIXIR, "perl": Language.PERL, "solidity": Language.SOL,
              "proto": Language.PROTO}


@dataclass
class Chunk:
    text: str
    file_id: str
    file_name: str
    kind: str = "file"  # file | turn
    page: int | None = None
    heading: str | None = None
    first_line: int | None = None
    last_line: int | None = None
    language: str | None = None
    turn: int | None = None  # kind "turn": index of the user message in the session

    def source(self) -> str:
        if self.kind == "turn":
            return "earlier in this chat"
        if self.page is not None:
            return f"{self.file_name}, page {self.page}"
        if self.first_line is not None and self.last_line is not None:
            return f"{self.file_name}, lines {self.first_line}-{self.last_line}"
        if self.heading:
            return f"{self.file_name}, “{self.heading}”"
        return self.file_name

    def to_dict(self) -> dict:
        return asdict(self)


def _splitter(language: str | None) -> RecursiveCharacterTextSplitter:
    if language in _LANGUAGES:
        return RecursiveCharacterTextSplitter.from_language(
            _LANGUAGES[language], chunk_size=CHUNK_CHARS, chunk_overlap=OVERLAP_CHARS, add_start_index=True)
    return RecursiveCharacterTextSplitter(chunk_size=CHUNK_CHARS, chunk_overlap=OVERLAP_CHARS,
                                          add_start_index=True)


def chunk_document(document: Document, file_id: str, file_name: str) -> list[Chunk]:
    splitter = _splitter(document.language or ("markdown" if document.kind == "markdown" else None))
    chunks: list[Chunk] = []
    for section in document.sections:
        for piece in splitter.create_documents([section.text]):
            text = piece.page_content
            if not text.strip():
                continue
            first = last = None
            if section.first_line is not None:
                start = piece.metadata.get("start_index", 0)
                first = section.first_line + section.text.count("\n", 0, max(0, start))
                last = first + text.count("\n")
            chunks.append(Chunk(text, file_id, file_name, page=section.page, heading=section.heading,
                                first_line=first, last_line=last, language=document.language))
    return chunks
