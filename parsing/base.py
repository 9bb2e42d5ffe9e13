"""What a parsed document looks like, and the error every parser raises."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class ParseError(Exception):
    """The file cannot be read; `reason` says why in words a user understands."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Section:
    """A run of text with the position a citation needs."""

    text: str
    page: int | None = None  # pdf: 1-based page
    heading: str | None = None  # docx/markdown: the heading it sits under
    first_line: int | None = None  # text/code: 1-based line where `text` starts


@dataclass
class Document:
    kind: str  # pdf | docx | text | markdown | code
    sections: list[Section] = field(default_factory=list)
    language: str | None = None  # code: python, rust, ...
    pages: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Document:
        return cls(data["kind"], [Section(**s) for s in data["sections"]], data.get("language"), data.get("pages"))

    @property
    def characters(self) -> int:
        return sum(len(s.text) for s in self.sections)
