"""Parsing real files (made by the tests) and refusing hostile ones with a clear reason."""

from __future__ import annotations

import pytest

from parsing import ParseError, ParseLimits, parse_file, parse_isolated
from tests import files


def test_pdf_keeps_page_numbers():
    document = parse_file("story.pdf", files.pdf_bytes())
    assert document.kind == "pdf" and document.pages == 3
    assert [s.page for s in document.sections] == [1, 2, 3]
    assert "Marta Olsen" in document.sections[1].text


def test_docx_keeps_headings_and_tables():
    document = parse_file("budget.docx", files.docx_bytes())
    assert [s.heading for s in document.sections] == ["Quarterly budget", "Staffing"]
    assert "Radio ads | 12,900 EUR" in document.sections[0].text
    assert "engineers" in document.sections[1].text


@pytest.mark.parametrize("name, language", [("geometry.py", "python"), ("server.rs", "rust"), ("cart.js", "js")])
def test_code_is_recognised_with_its_language_and_lines(name, language):
    document = parse_file(name, files.CODE[name].encode())
    assert document.kind == "code" and document.language == language
    assert document.sections[0].first_line == 1


def test_code_without_an_extension_is_recognised_by_its_shebang():
    document = parse_file("deploy", b"#!/usr/bin/env bash\nset -e\necho deploying\n")
    assert document.language == "shell"


def test_markdown_is_split_at_headings_with_line_numbers():
    text = "# Intro\nhello\n\n## Usage\nrun it\n"
    document = parse_file("README.md", text.encode())
    assert [(s.heading, s.first_line) for s in document.sections] == [("Intro", 1), ("Usage", 4)]


@pytest.mark.parametrize("name, data, reason", [
    ("secret.pdf", files.pdf_bytes(password="hunter2"), "encrypted"),
    ("broken.pdf", files.pdf_bytes()[:300], "damaged"),
    ("fake.pdf", b"%PDF-1.4\n garbage garbage", "damaged"),
    ("bomb.docx", files.zip_bomb_docx(), "zip bomb"),
    ("laughs.docx", files.entity_bomb_docx(), "entit"),
    ("notes.txt", files.binary_bytes(), "binary"),
    ("empty.txt", b"", "empty"),
    ("blank.md", b"   \n\n ", "empty"),
    ("notzip.docx", b"PK not really", "not a valid .docx"),
    ("photo.png", b"\x89PNG....", "not supported"),
])
def test_hostile_and_broken_files_get_a_clear_reason(name, data, reason):
    with pytest.raises(ParseError) as info:
        parse_isolated(name, data, ParseLimits(seconds=60))
    assert reason in info.value.reason


def test_parsing_is_stopped_by_its_time_bound():
    with pytest.raises(ParseError, match="longer than"):
        parse_isolated("story.pdf", files.pdf_bytes(), ParseLimits(seconds=0.05))


def test_parsing_is_stopped_by_its_memory_bound():
    with pytest.raises(ParseError):
        parse_isolated("story.pdf", files.pdf_bytes(), ParseLimits(seconds=60, memory_bytes=32 * 2**20))


def test_isolated_parse_returns_the_same_document():
    assert parse_isolated("budget.docx", files.docx_bytes()) == parse_file("budget.docx", files.docx_bytes())


def test_a_parse_paused_for_busy_chats_still_finishes_and_only_its_running_time_counts():
    asked = []

    def chats_generating():
        asked.append(1)
        return True  # chats never stop: the parse runs only in short slices

    document = parse_isolated("story.pdf", files.pdf_bytes(), ParseLimits(seconds=30), busy=chats_generating,
                              yield_seconds=0.3)
    assert document == parse_file("story.pdf", files.pdf_bytes())
    assert asked  # it was paused at least once
