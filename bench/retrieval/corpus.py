"""The documents of the retrieval evaluation: real files that ship on a Debian 12 machine or inside
the packages installed in Shoal's virtual environment, read where they lie (nothing is copied into
the repository), and the questions asked about them (`eval_set.json`).

    .venv/bin/python -m bench.retrieval.corpus --check

Each document entry of `eval_set.json` has:

- `name`: the file name it is uploaded under (`GPL-3.txt`, `torch-README.md`, ...);
- `type`: pdf | docx | text | markdown | code;
- `origin`: where it comes from, in words;
- `path`: an absolute path, or a path relative to the site-packages folder of Shoal's venv
  (`.venv/lib/python3.11/site-packages`; the running interpreter's own when that is missing);
- `sha256`: of the source file at `path`, the version the questions were written against;
- `package`: what installs it, `debian:<package>` or `pip:<name>==<version>`;
- `build` (optional): how the upload is made from the source file: `metadata-readme` takes the long
  description of a wheel's `METADATA` (everything after the header block); `docx-from-markdown`
  builds a Word document in memory from a Markdown file with python-docx (headings to Title and
  Heading styles, bullet items to List Bullet, numbered items to List Number, tables to real tables,
  code blocks to paragraphs in a monospace font). Without `build` the file is uploaded as it is;
- `note` (optional): what a reader of the results should know about the document.

Each question has `id`, `question`, `type` (single | span | table | none), `answers` (a list of
`{"file", "contains", "page" | "lines"}`), `need` (any | all), an optional `note`, and, for `none`
questions, `about` (the document whose subject it is about) and optionally `absent` (words that
must occur in no document, checked here). `page` is 1-based as the pdf parser numbers pages;
`lines` is `[first, last]`, 1-based lines of the uploaded file (for a README, of the extracted
description); a docx answer has neither. `contains` is 3-8 words (tokens with a letter or digit)
copied from the parsed text.

A passage answers when `matches()` says so: same file; same page if the answer has one; overlapping
lines if it has them; and the answer's `contains`, with whitespace collapsed and lowercased, inside
the passage text treated the same way.

`--check` parses every document with Shoal's own parser (`parsing.parse_isolated`) and verifies that
every answer's phrase is in the cited page / lines (and only once there), that a span question's
pieces are far apart, and that the `absent` words of no-answer questions occur in no document.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import sysconfig
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

DATA = Path(__file__).with_name("eval_set.json")
REPO = Path(__file__).resolve().parents[2]
QUESTION_TYPES = ("single", "span", "table", "none")
SPAN_MIN_CHARS = 1500  # a span question's pieces are on different pages or at least this far apart


def _load() -> dict:
    with open(DATA, encoding="utf-8") as handle:
        return json.load(handle)


EVAL_SET = _load()
DOCUMENTS: list[dict] = EVAL_SET["documents"]
QUESTIONS: list[dict] = EVAL_SET["questions"]


def site_packages() -> Path:
    """Shoal's venv site-packages, else the running interpreter's."""
    found = sorted(REPO.glob(".venv/lib/python3*/site-packages"))
    return found[-1] if found else Path(sysconfig.get_paths()["purelib"])


def source_path(entry: dict) -> Path:
    path = Path(entry["path"])
    return path if path.is_absolute() else site_packages() / path


def _install_hint(entry: dict) -> str:
    kind, _, name = entry["package"].partition(":")
    if kind == "debian":
        return f"Debian package {name} (apt-get install {name})"
    return f"pip package {name} (pip install {name})"


# -- building uploads from sources ----------------------------------------------------------------

def metadata_readme(raw: bytes) -> bytes:
    """The long description of a wheel's METADATA: what follows the first blank line."""
    text = raw.decode("utf-8")
    _, _, body = text.partition("\n\n")
    return body.encode("utf-8")


_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # [text](url) and images ![alt](url)
_REF_LINK = re.compile(r"\[([^\]^]+)\]\[[^\]]*\]")  # [text][ref]
_AUTOLINK = re.compile(r"<(https?://[^>]+)>")
_FOOTNOTE_REF = re.compile(r"\[\^(\d+)\]")
_REF_DEFINITION = re.compile(r"^\[[^\]^]+\]:\s+\S+\s*$")
_FOOTNOTE_DEFINITION = re.compile(r"^\[\^(\d+)\]:\s*(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[*-]\s+(.*)$")
_NUMBERED = re.compile(r"^(\s*)\d+\.\s+(.*)$")
_ALERT = re.compile(r"^\\?\[!(\w+)\]")


def _inline(text: str) -> str:
    """Markdown inline markup to plain text: links keep their text, emphasis and code marks go."""
    text = _LINK.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _FOOTNOTE_REF.sub(r"[\1]", text)
    text = text.replace("**", "").replace("`", "")
    text = re.sub(r"\\([\[\]_*!#.`\\-])", r"\1", text)
    return " ".join(text.split())


def markdown_to_docx(markdown: str, skip_sections: tuple[str, ...] = ("Table of contents",)) -> bytes:
    """A Word document with the text and structure of a Markdown file (same text on every run)."""
    import docx
    from docx.shared import Pt

    document = docx.Document()
    properties = document.core_properties
    fixed = datetime(2024, 1, 1, tzinfo=UTC)
    properties.author, properties.created, properties.modified, properties.revision = "", fixed, fixed, 1
    heading_styles = {1: "Title", 2: "Heading 1", 3: "Heading 2", 4: "Heading 3", 5: "Heading 4", 6: "Heading 5"}
    lines = markdown.split("\n")
    paragraph: list[str] = []
    item: tuple[str, list[str]] | None = None  # (style, lines) of the list item being read
    skipping = quoting = False

    def flush() -> None:
        nonlocal paragraph, item
        if paragraph:
            document.add_paragraph(_inline(" ".join(paragraph)), style=None)
            paragraph = []
        if item:
            document.add_paragraph(_inline(" ".join(item[1])), style=item[0])
            item = None

    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        heading = _HEADING.match(line)
        if heading:
            flush()
            title = _inline(heading.group(2))
            skipping = title in skip_sections
            if not skipping:
                document.add_paragraph(title, style=heading_styles[len(heading.group(1))])
            index += 1
            continue
        if skipping:
            index += 1
            continue
        fence = stripped.lstrip("> ").startswith("```")
        if fence:  # a code block, possibly inside a list item or a quote: one monospace paragraph
            flush()
            prefix = line[: len(line) - len(line.lstrip(" >"))]
            code, index = [], index + 1
            while index < len(lines) and not lines[index].strip().lstrip("> ").startswith("```"):
                code.append(lines[index][len(prefix):] if lines[index].startswith(prefix) else lines[index].strip())
                index += 1
            index += 1
            if any(c.strip() for c in code):
                run = document.add_paragraph(style="No Spacing").add_run("\n".join(code).strip("\n"))
                run.font.name, run.font.size = "Courier New", Pt(9)
            continue
        if stripped.startswith("<!--") or _REF_DEFINITION.match(stripped):
            flush()
            index += 1
            continue
        if stripped.startswith("|"):  # a table: header row, separator row, body rows
            flush()
            rows = []
            while index < len(lines) and lines[index].strip().startswith("|"):
                cells = [_inline(c) for c in lines[index].strip().strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    rows.append(cells)
                index += 1
            table = document.add_table(rows=len(rows), cols=max(len(r) for r in rows))
            table.style = "Table Grid"
            for r, cells in enumerate(rows):
                for c, text in enumerate(cells):
                    cell_paragraph = table.cell(r, c).paragraphs[0]
                    cell_paragraph.add_run(text).bold = r == 0
            continue
        footnote = _FOOTNOTE_DEFINITION.match(stripped)
        bullet, numbered = _BULLET.match(line), _NUMBERED.match(line)
        if footnote:
            flush()
            item = ("Normal", [f"[{footnote.group(1)}] {footnote.group(2)}"])
        elif bullet:
            flush()
            item = ("List Bullet 2" if len(bullet.group(1)) >= 2 else "List Bullet", [bullet.group(2)])
        elif numbered:
            flush()
            item = ("List Number", [numbered.group(2)])
        elif not stripped:
            flush()
        elif stripped.startswith(">"):  # a quote (GitHub's "> [!NOTE]" alerts become "Note:")
            if item or not quoting:
                flush()
            text = _ALERT.sub(lambda m: m.group(1).capitalize() + ":", stripped.lstrip("> ").strip())
            if text:
                paragraph.append(text)
            else:
                flush()
            quoting = True
            index += 1
            continue
        elif item and line.startswith(" "):
            item[1].append(stripped)
        else:
            if item or quoting:
                flush()
            paragraph.append(stripped)
        quoting = False
        index += 1
    flush()
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def upload_bytes(entry: dict, raw: bytes) -> bytes:
    build = entry.get("build")
    if build is None:
        return raw
    if build == "metadata-readme":
        return metadata_readme(raw)
    if build == "docx-from-markdown":
        return markdown_to_docx(raw.decode("utf-8"))
    raise ValueError(f"{entry['name']}: unknown build {build!r}")


def materialize() -> list[tuple[str, bytes, dict]]:
    """(upload name, bytes, document entry) for every document present on this machine.

    A missing source is skipped with a warning naming the package that installs it; a source whose
    sha256 differs from the recorded one is used, with a warning (the answers may have moved)."""
    out = []
    for entry in DOCUMENTS:
        path = source_path(entry)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            print(f"warning: {entry['name']} is missing ({path}: {exc.strerror}); it comes from the "
                  f"{_install_hint(entry)}. It is left out (its questions cannot be answered).", file=sys.stderr)
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest != entry["sha256"]:
            print(f"warning: {entry['name']}: {path} has sha256 {digest[:16]}..., not the {entry['sha256'][:16]}... "
                  f"the questions were written for (another version of the {_install_hint(entry)}?); "
                  "using it anyway, some answers may have moved.", file=sys.stderr)
        out.append((entry["name"], upload_bytes(entry, raw), entry))
    return out


# -- matching -------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def matches(passage_file: str, passage_text: str, passage_page: int | None,
            passage_lines: tuple[int, int] | None, answer: dict) -> bool:
    """Whether a retrieved passage answers: same file, same page / overlapping lines when the
    answer has them, and the answer's phrase inside the passage (whitespace and case aside)."""
    if passage_file != answer["file"]:
        return False
    if "page" in answer and passage_page != answer["page"]:
        return False
    if "lines" in answer:
        if passage_lines is None:
            return False
        first, last = answer["lines"]
        if passage_lines[1] < first or passage_lines[0] > last:
            return False
    return normalise(answer["contains"]) in normalise(passage_text)


def question_document(question: dict) -> str:
    """The document a question is about: its first answer's file, or `about` for a none question."""
    return question["answers"][0]["file"] if question["answers"] else question["about"]


# -- the check ------------------------------------------------------------------------------------

def _normalise_with_lines(text: str, first_line: int) -> tuple[str, list[int]]:
    """`normalise(text)` and, for each of its characters, the line of `text` it comes from."""
    chars: list[str] = []
    where: list[int] = []
    line = first_line
    pending_space = False
    for ch in text:
        if ch.isspace():
            pending_space = bool(chars)
            if ch == "\n":
                line += 1
            continue
        if pending_space:
            chars.append(" ")
            where.append(line)
            pending_space = False
        chars.append(ch.lower())
        where.append(line)
    return "".join(chars), where


def _occurrences(haystack: str, needle: str) -> list[int]:
    found, start = [], haystack.find(needle)
    while start >= 0:
        found.append(start)
        start = haystack.find(needle, start + 1)
    return found


def _parse_all(uploads: list[tuple[str, bytes, dict]]) -> dict:
    from parsing import ParseLimits, parse_isolated

    parsed = {}
    for name, data, entry in uploads:
        document = parse_isolated(name, data, ParseLimits())
        if document.kind != entry["type"]:
            raise SystemExit(f"{name}: the parser reads it as {document.kind}, the entry says {entry['type']}")
        parsed[name] = document
    return parsed


def _locate(document, answer: dict) -> tuple[list[str], int | None, int | None]:
    """Check one answer against a parsed document: (problems, page, offset in the whole document)."""
    phrase = normalise(answer["contains"])
    problems: list[str] = []
    words = sum(1 for word in answer["contains"].split() if any(ch.isalnum() for ch in word))
    if not 3 <= words <= 8:
        problems.append(f"'contains' has {words} words (3-8 wanted)")
    whole = normalise("\n".join(s.text for s in document.sections))
    total = len(_occurrences(whole, phrase))
    offset = whole.find(phrase) if total else None
    if document.kind == "pdf":
        if "page" not in answer:
            return problems + ["a pdf answer needs 'page'"], None, offset
        sections = [s for s in document.sections if s.page == answer["page"]]
        here = sum(len(_occurrences(normalise(s.text), phrase)) for s in sections)
        if here == 0:
            pages = sorted({s.page for s in document.sections if phrase in normalise(s.text)})
            problems.append(f"not on page {answer['page']}" + (f" (found on page(s) {pages})" if pages else
                                                               " (nowhere in the document)"))
        elif here > 1:
            problems.append(f"occurs {here} times on page {answer['page']}: not distinctive")
        else:
            before = normalise("\n".join(s.text for s in document.sections if s.page < answer["page"]))
            offset = len(before) + normalise(sections[0].text).find(phrase)
        return problems, answer["page"], offset
    if document.kind == "docx":
        if "page" in answer or "lines" in answer:
            problems.append("a docx answer has neither 'page' nor 'lines'")
        if total == 0:
            problems.append("not in the document")
        elif total > 1:
            problems.append(f"occurs {total} times in the document: not distinctive")
        return problems, None, offset
    if "lines" not in answer:
        return problems + [f"a {document.kind} answer needs 'lines'"], None, offset
    first, last = answer["lines"]
    hits = []  # (first line, last line, offset in the whole document) of each occurrence
    base = 0
    for section in document.sections:
        text, where = _normalise_with_lines(section.text, section.first_line or 1)
        for start in _occurrences(text, phrase):
            hits.append((where[start], where[start + len(phrase) - 1], base + start))
        base += len(text) + 1
    inside = [h for h in hits if first <= h[0] and h[1] <= last]
    if not inside:
        found = [h[:2] for h in hits]
        problems.append(f"not within lines {first}-{last}" + (f" (found at lines {found})" if hits else
                                                              " (nowhere in the document)"))
    elif len(inside) > 1:
        problems.append(f"occurs {len(inside)} times within lines {first}-{last}: not distinctive")
    if last - first > 40:
        problems.append(f"lines {first}-{last} is a wide range; cite the answering passage")
    if inside:
        offset = inside[0][2]
    return problems, None, offset


def check() -> int:
    uploads = materialize()
    present = {name for name, _, _ in uploads}
    parsed = _parse_all(uploads)
    names = {d["name"] for d in DOCUMENTS}
    failures: list[str] = []
    ids = Counter(q["id"] for q in QUESTIONS)
    failures += [f"{i}: id used {n} times" for i, n in ids.items() if n > 1]
    texts = {name: normalise("\n".join(s.text for s in d.sections)) for name, d in parsed.items()}
    skipped = 0
    for q in QUESTIONS:
        qid, kind, answers = q["id"], q.get("type"), q.get("answers", [])
        if kind not in QUESTION_TYPES:
            failures.append(f"{qid}: type {kind!r}")
            continue
        if q.get("need") not in ("any", "all"):
            failures.append(f"{qid}: need {q.get('need')!r}")
        if kind == "none":
            if answers or q.get("about") not in names:
                failures.append(f"{qid}: a none question has no answers and names its document in 'about'")
            for word in q.get("absent", []):
                pattern = re.compile(rf"(?<!\w){re.escape(normalise(word))}(?!\w)")
                found = [name for name, text in texts.items() if pattern.search(text)]
                if found:
                    failures.append(f"{qid}: '{word}' (said to be absent) occurs in {found}")
            continue
        if not answers:
            failures.append(f"{qid}: no answers")
            continue
        if kind == "span" and (len(answers) < 2 or q["need"] != "all"):
            failures.append(f"{qid}: a span question has two or more answers and need 'all'")
        positions = []
        for n, answer in enumerate(answers, 1):
            if answer["file"] not in names:
                failures.append(f"{qid} answer {n}: unknown file {answer['file']}")
                continue
            if answer["file"] not in present:
                skipped += 1
                continue
            problems, page, offset = _locate(parsed[answer["file"]], answer)
            failures += [f"{qid} answer {n} ({answer['file']}, '{answer['contains']}'): {p}" for p in problems]
            positions.append((answer["file"], page, offset))
        if kind == "span" and len(positions) >= 2:
            for (file_a, page_a, at_a), (file_b, page_b, at_b) in zip(positions, positions[1:]):
                if file_a != file_b or (page_a is not None and page_a != page_b):
                    continue
                if at_a is not None and at_b is not None and abs(at_a - at_b) < SPAN_MIN_CHARS:
                    failures.append(f"{qid}: span pieces only {abs(at_a - at_b)} characters apart "
                                    f"(>= {SPAN_MIN_CHARS} wanted)")
    _summary(parsed)
    for failure in failures:
        print(f"FAIL {failure}")
    if skipped:
        print(f"{skipped} answers not checked: their document is missing")
    print(f"{len(QUESTIONS)} questions, {len(failures)} failures")
    return 1 if failures else 0


def _summary(parsed: dict) -> None:
    per_doc: dict[str, Counter] = {d["name"]: Counter() for d in DOCUMENTS}
    for q in QUESTIONS:
        per_doc.setdefault(question_document(q), Counter())[q["type"]] += 1
    header = f"{'document':34} {'type':9} {'chars':>7} " + " ".join(f"{t:>6}" for t in QUESTION_TYPES) + "  total"
    print(header)
    for entry in DOCUMENTS:
        counts = per_doc[entry["name"]]
        document = parsed.get(entry["name"])
        chars = f"{document.characters:7d}" if document else "missing"
        print(f"{entry['name']:34} {entry['type']:9} {chars} " + " ".join(f"{counts[t]:6d}" for t in QUESTION_TYPES)
              + f"  {sum(counts.values()):5d}")
    totals = Counter(q["type"] for q in QUESTIONS)
    chars = sum(d.characters for d in parsed.values())
    print(f"{'all':34} {'':9} {chars:7d} " + " ".join(f"{totals[t]:6d}" for t in QUESTION_TYPES)
          + f"  {len(QUESTIONS):5d}")


def main() -> None:
    parser = argparse.ArgumentParser(description="The retrieval evaluation's documents and questions.")
    parser.add_argument("--check", action="store_true", help="parse every document and verify every answer")
    parser.add_argument("--dump", metavar="FOLDER", help="write each parsed document's text to FOLDER")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.dump:
        folder = Path(args.dump)
        folder.mkdir(parents=True, exist_ok=True)
        for name, document in _parse_all(materialize()).items():
            parts = [f"=== {s.page or s.first_line or ''} {s.heading or ''}\n{s.text}" for s in document.sections]
            (folder / f"{name}.txt").write_text("\n".join(parts), encoding="utf-8")
        print(f"wrote {len(DOCUMENTS)} documents to {folder}")
    if args.check:
        sys.exit(check())
    if not (args.check or args.dump):
        parser.print_help()


if __name__ == "__main__":
    main()
