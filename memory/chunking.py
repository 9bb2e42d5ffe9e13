"""Cutting parsed documents into passages that keep their structure and remember where they came from.

Prose (pdf, docx, text, markdown) is read as blocks: headings, paragraphs, list items (with
their wrapped lines) and tables (consecutive rows). Blocks are packed into passages of up to
`CHUNK_CHARS` without cutting one, a new heading starts a new passage, a table too long for one
passage is cut between rows with its header row repeated, and only a block longer than a whole
passage is cut inside (by langchain's recursive splitter). Each passage carries its heading path
("2 Unified system › 2.4 The glob files"), which goes into the text that is embedded and indexed,
and its page, heading or line range for citations. A short last block of one passage is repeated
at the start of the next, so an answer that runs over the cut is in one passage whole.

Code goes through langchain's language-aware splitter (functions and classes stay whole where
they fit) and cites line ranges.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from parsing import Document

CHUNK_CHARS = 1200  # measured best of 500-1600 on bench/retrieval_eval.py (MiniLM reads ~1000)
OVERLAP_CHARS = 120
CARRY_CHARS = 240  # a block at most this long at the end of a passage is repeated in the next
_LANGUAGES = {"python": Language.PYTHON, "js": Language.JS, "ts": Language.TS, "go": Language.GO,
              "rust": Language.RUST, "java": Language.JAVA, "cpp": Language.CPP, "c": Language.C,
              "csharp": Language.CSHARP, "kotlin": Language.KOTLIN, "swift": Language.SWIFT,
              "ruby": Language.RUBY, "php": Language.PHP, "scala": Language.SCALA, "lua": Language.LUA,
              "html": Language.HTML, "markdown": Language.MARKDOWN, "haskell": Language.HASKELL,
              "elixir": Language.ELIXIR, "perl": Language.PERL, "solidity": Language.SOL,
              "proto": Language.PROTO}

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_NUMBERED = re.compile(r"^(\d{1,2}(?:\.\d{1,2}){0,3})\.?\s+([A-Z][^\n]{0,78})$")
_LEADER = re.compile(r"(\s?\.){4,}\s*\d*\s*$")  # table-of-contents dot leaders
_ITEM = re.compile(r"^\s*(?:[-*+•◦▪‣●–]|\(?\d{1,3}[.)]|\(?[a-z][.)])\s+\S")
_MD_ROW = re.compile(r"^\s*\|.*\|\s*$")
_MD_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_PAGE_NUMBER = re.compile(r"^\s*(?:page\s+)?[ivxlc\d]{1,4}\s*$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?:;]['\")\]]?$")


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
    context: str | None = None  # heading path, e.g. "2 Unified system › 2.4 The glob files"

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

    def index_text(self) -> str:
        """What is embedded and indexed: the passage under its heading path."""
        return f"{self.context}\n{self.text}" if self.context else self.text

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Block:
    kind: str  # heading | para | item | table
    lines: list[str]
    first: int  # 0-based line offsets inside the section
    last: int
    level: int = 0  # heading depth
    title: str = ""
    closed: bool = False  # nothing more joins it

    def add(self, line: str, number: int) -> None:
        self.lines.append(line)
        self.last = number

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _splitter(language: str | None, size: int) -> RecursiveCharacterTextSplitter:
    overlap = min(OVERLAP_CHARS, size // 4)
    if language in _LANGUAGES:
        return RecursiveCharacterTextSplitter.from_language(
            _LANGUAGES[language], chunk_size=size, chunk_overlap=overlap, add_start_index=True)
    return RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=overlap, add_start_index=True)


class _Headings:
    """The heading path, and which numbered lines of a PDF are headings: only a number that
    follows the last one ("2.4" after "2.3", "2.3.1" or "3" after "2.3") counts, so table rows
    and list items that start with a number are not taken for headings."""

    def __init__(self):
        self.path: list[tuple[int, str]] = []
        self.numbers: list[int] = []

    def numbered(self, line: str) -> tuple[int, str] | None:
        match = _NUMBERED.match(line.strip())
        words = match.group(2).split() if match else []
        if not match or _LEADER.search(line) or len(words) > 12 or match.group(2).rstrip()[-1:] in ",;:" \
                or (match.group(2).endswith(".") and len(words) > 10):
            return None
        number = [int(p) for p in match.group(1).split(".")]
        expected = [self.numbers[:i] + [self.numbers[i] + 1] for i in range(len(self.numbers))]
        expected += [self.numbers + [1]] + ([[0]] if not self.numbers else [])
        if number not in expected:
            return None
        self.numbers = number
        return len(number), line.strip()

    def enter(self, level: int, title: str) -> None:
        self.path = [(lv, t) for lv, t in self.path if lv < level] + [(level, title)]

    def context(self) -> str | None:
        return " › ".join(t for _, t in self.path) or None


def _blocks(text: str, kind: str, headings: _Headings, section_heading: str | None) -> list[_Block]:
    lines = text.split("\n")
    blocks: list[_Block] = []
    widest = max((len(line.rstrip()) for line in lines), default=0)
    fenced = False
    for number, line in enumerate(lines):
        stripped = line.strip()
        last = blocks[-1] if blocks else None
        if kind == "markdown" and stripped.startswith(("```", "~~~")):
            fenced = not fenced
        if not stripped and not fenced:
            if last is not None:
                last.closed = True  # a blank line ends a paragraph, an item, a table
            continue
        code = fenced or stripped.startswith(("```", "~~~"))  # nothing in a code block is a heading
        heading = None if code else _heading(stripped, kind, number, headings, section_heading)
        if heading:
            blocks.append(_Block("heading", [line], number, number, heading[0], heading[1], closed=True))
            continue
        if not fenced and (_MD_ROW.match(line) or (kind == "docx" and " | " in line)):
            if last is not None and last.kind == "table" and not last.closed:
                last.add(line, number)
            else:
                blocks.append(_Block("table", [line], number, number))
            continue
        if not fenced and _ITEM.match(line):
            blocks.append(_Block("item", [line], number, number))
            continue
        # a line joins the open paragraph or item unless the line before it ended a sentence well
        # short of the page width (how a paragraph ends in text pulled from a PDF)
        previous = lines[number - 1].rstrip() if number else ""
        ended = not fenced and bool(_SENTENCE_END.search(previous)) and len(previous) < 0.8 * widest
        if last is not None and last.kind in ("para", "item") and not last.closed and not ended:
            last.add(line, number)
        else:
            blocks.append(_Block("para", [line], number, number))
    return blocks


def _heading(stripped: str, kind: str, number: int, headings: _Headings,
             section_heading: str | None) -> tuple[int, str] | None:
    """(level, title) when this line is a heading of a document of this kind."""
    if kind == "markdown" and (match := _MD_HEADING.match(stripped)):
        return len(match.group(1)), match.group(2)
    if kind in ("pdf", "text"):
        return headings.numbered(stripped)
    if kind == "docx" and number == 0 and section_heading and stripped == section_heading:
        return 1, stripped
    return None


def _pieces(block: _Block, size: int) -> list[_Block]:
    """A block longer than a passage, cut: tables between rows (header repeated), others by text."""
    if len(block.text) <= size:
        return [block]
    if block.kind == "table" and len(block.lines) > 1:
        header = block.lines[:2] if len(block.lines) > 2 and _MD_RULE.match(block.lines[1]) else block.lines[:1]
        rows = block.lines[len(header):]
        pieces: list[_Block] = []
        current: list[str] = []
        start = block.first + len(header)
        for offset, row in enumerate(rows):
            if current and len("\n".join(header + current + [row])) > size:
                pieces.append(_Block("table", header + current, start, block.first + len(header) + offset - 1))
                current, start = [], block.first + len(header) + offset
            current.append(row)
        if current:
            pieces.append(_Block("table", header + current, start, block.last))
        return pieces
    pieces = []
    for doc in _splitter(None, size).create_documents([block.text]):
        begin = doc.metadata.get("start_index", 0)
        first = block.first + block.text.count("\n", 0, max(0, begin))
        pieces.append(_Block("para", doc.page_content.split("\n"), first, first + doc.page_content.count("\n")))
    return pieces


def _page_furniture(document: Document) -> set[str]:
    """Running headers and footers of a PDF: a first or last line that recurs on many pages, and
    page numbers; they would otherwise split paragraphs and crowd passages."""
    if document.kind != "pdf" or len(document.sections) < 4:
        return set()
    seen: dict[str, int] = {}
    for section in document.sections:
        lines = [line.strip() for line in section.text.split("\n") if line.strip()]
        for line in {*lines[:2], *lines[-2:]}:
            key = re.sub(r"\d+", "#", line)
            seen[key] = seen.get(key, 0) + 1
    return {key for key, times in seen.items() if times >= max(3, len(document.sections) // 3)}


def _structured(document: Document, file_id: str, file_name: str, size: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    headings = _Headings()
    furniture = _page_furniture(document)
    for section in document.sections:
        text = section.text
        if furniture or document.kind == "pdf":
            text = "\n".join("" if (re.sub(r"\d+", "#", line.strip()) in furniture or _PAGE_NUMBER.match(line))
                             else line for line in text.split("\n"))
        current: list[_Block] = []
        context = headings.context()
        for block in _blocks(text, document.kind, headings, section.heading):
            if block.kind == "heading":
                _emit(chunks, current, section, document, file_id, file_name, context)
                headings.enter(block.level, block.title)
                context = headings.context()
                current = [block]
                continue
            for piece in _pieces(block, size):
                if current and len("\n".join(b.text for b in current + [piece])) > size:
                    current = _emit(chunks, current, section, document, file_id, file_name, context,
                                    carry=piece.kind != "table")
                    if current and len("\n".join(b.text for b in current + [piece])) > size:
                        current = []
                current.append(piece)
        _emit(chunks, current, section, document, file_id, file_name, context)
    return chunks


def _emit(chunks: list[Chunk], blocks: list[_Block], section, document: Document, file_id: str, file_name: str,
          context: str | None, carry: bool = False) -> list[_Block]:
    """Make a passage of `blocks` (unless they are only a heading); returns what the next one
    starts with: the last block when it is short enough to repeat, else nothing."""
    if not any(b.kind != "heading" for b in blocks):
        return blocks
    text = "\n".join(b.text for b in blocks).strip()
    first = last = None
    if section.first_line is not None:
        first, last = section.first_line + blocks[0].first, section.first_line + blocks[-1].last
    chunks.append(Chunk(text, file_id, file_name, page=section.page, heading=section.heading,
                        first_line=first, last_line=last, language=document.language, context=context))
    tail = blocks[-1]
    return [tail] if carry and tail.kind != "heading" and len(tail.text) <= CARRY_CHARS else []


def chunk_document(document: Document, file_id: str, file_name: str, size: int = CHUNK_CHARS) -> list[Chunk]:
    if document.kind == "code":
        return _code_chunks(document, file_id, file_name, size)
    return _structured(document, file_id, file_name, size)


def _code_chunks(document: Document, file_id: str, file_name: str, size: int) -> list[Chunk]:
    splitter = _splitter(document.language, size)
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
