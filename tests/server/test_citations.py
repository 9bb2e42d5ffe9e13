"""An answer's inline citations ([n]) as links to its passages (server/ui_common.cite_links), as the
chat UI shows them: only the numbers of its sources become links, built from escaped text, and the
answer's Markdown is otherwise left exactly as the model wrote it."""

from __future__ import annotations

import re

from memory.store import StoredMessage
from server.ui_common import chat_view, cite_links, sources_html

STORY = {"source": "story.pdf, page 2", "excerpt": "She kept a green notebook.", "score": 0.61,
         "section": "Chapter 1", "file": "f1", "page": 2}
OTHER = {"source": "notes.txt, lines 1-4", "excerpt": "Storms came in autumn.", "score": 0.3, "file": "f2"}


def links(text: str) -> list[tuple[str, str]]:
    """(href, label) of each citation link."""
    return re.findall(r'<a class="shoal-cite" href="([^"]*)" title="[^"]*">(.*?)</a>', text)


def unlinked(text: str) -> str:
    """The text with each citation link back as the model wrote it."""
    return re.sub(r'<a class="shoal-cite"[^>]*>(.*?)</a>', r"\1", text).replace("&#91;", "[").replace("&#93;", "]")


def test_a_cited_number_of_a_source_becomes_a_link_to_its_passage():
    out = cite_links("Maren wrote it down [1]. Storms [2] came.", [STORY, OTHER], "shoal-m3")
    assert out == ('Maren wrote it down <a class="shoal-cite" href="#shoal-m3-1" title="story.pdf, page 2">'
                   '&#91;1&#93;</a>. Storms <a class="shoal-cite" href="#shoal-m3-2" '
                   'title="notes.txt, lines 1-4">&#91;2&#93;</a> came.')
    html = sources_html([STORY, OTHER], "shoal-m3")
    for href, _ in links(out):  # each link has its passage, by id
        assert html.count(f"id='{href[1:]}'") == 1


def test_numbers_that_are_not_sources_stay_plain_text():
    text = "See [9], [0], [01], [3] and [1, 9]."
    out = cite_links(text, [STORY, OTHER], "m")
    assert links(out) == [("#m-1", "1")]
    assert out == 'See [9], [0], [01], [3] and [<a class="shoal-cite" href="#m-1" title="story.pdf, page 2">1</a>, 9].'
    assert cite_links("Nothing cited [4].", [STORY], "m") == "Nothing cited [4]."


def test_groups_of_numbers_keep_their_brackets_and_separators():
    out = cite_links("Both [1, 2], [1,2], [1;2] and [1][2].", [STORY, OTHER], "m")
    assert [label for _, label in links(out)] == ["1", "2"] * 3 + ["&#91;1&#93;", "&#91;2&#93;"]
    assert unlinked(out) == "Both [1, 2], [1,2], [1;2] and [1][2]."


def test_the_same_passage_given_twice_is_one_entry_both_numbers_link_to():
    sources = [STORY, OTHER, dict(STORY, score=0.5)]  # [3]: the same source and excerpt as [1]
    out = cite_links("First [1], again [3], other [2].", sources, "m")
    assert [href for href, _ in links(out)] == ["#m-1", "#m-1", "#m-2"]
    html = sources_html(sources, "m")
    assert html.count("class='shoal-source'") == 2 and "id='m-1'><b>[1, 3] story.pdf, page 2</b>" in html
    assert "id='m-3'" not in html


def test_source_names_are_escaped_and_the_answers_own_text_is_left_as_written():
    evil = {"source": 'a"<b>&.txt', "excerpt": "<script>x</script>", "score": 1}
    text = "Raw <b>bold</b> & *stars* [1] \\[1] ![1](img.png) [1](http://x) <a href='[1]'>[1]</a>"
    out = cite_links(text, [evil], "m")
    assert out == ('Raw <b>bold</b> & *stars* <a class="shoal-cite" href="#m-1" title="a&quot;&lt;b&gt;&amp;.txt">'
                   "&#91;1&#93;</a> \\[1] ![1](img.png) [1](http://x) <a href='[1]'>[1]</a>")
    html = sources_html([evil], "m")
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "a&quot;&lt;b&gt;&amp;.txt" in html and "<script>" not in html


def test_code_and_link_definitions_are_not_touched():
    text = ("Inline `[1]` and ``a [1] b`` but [1].\n\n```python\nx = y[1]\n```\n"
            "1. step\n    ```\n    [1]\n    ```\n~~~\n[1]\n~~~\n[2]: https://example.com\nend [2]")
    out = cite_links(text, [STORY, OTHER], "m")
    assert links(out) == [("#m-1", "&#91;1&#93;"), ("#m-2", "&#91;2&#93;")]
    assert unlinked(out) == text


def test_chat_view_links_each_answers_citations_to_its_own_passages():
    stored = [StoredMessage("user", "Who kept notes?"),
              StoredMessage("assistant", "Maren [1].", meta={"sources": [STORY]}),
              StoredMessage("user", "And the storms?"),
              StoredMessage("assistant", "In autumn [1], see [2].", meta={"sources": [OTHER]}),
              StoredMessage("assistant", "No sources here [1].")]
    view = chat_view(stored)
    first, second, plain = view[1]["content"], view[3]["content"], view[4]["content"]
    assert links(first) == [("#shoal-m1-1", "&#91;1&#93;")] and "id='shoal-m1-1'" in first
    assert links(second) == [("#shoal-m3-1", "&#91;1&#93;")] and "id='shoal-m3-1'" in second
    assert "see [2]." in second  # not a source of this answer
    assert plain == "No sources here [1]."
    assert view[0]["content"] == "Who kept notes?"


def test_each_passage_has_its_id_and_without_an_anchor_none():
    listed = ("<details class='shoal-sources'><summary>Sources: [1] story.pdf, page 2</summary>"
              "<p{}><b>[1] story.pdf, page 2</b> · Chapter 1 · relevance 0.61<br>She kept a green notebook.</p>"
              "</details>")
    assert sources_html([STORY], "shoal-m7") == listed.format(" class='shoal-source' id='shoal-m7-1'")
    assert sources_html([STORY]) == listed.format("")
