"""Citations you can open, in headless Chromium: an answer's [n] that cites one of its passages is a
link; clicking it unfolds that passage (file and page, relevance, the text) under the answer. Works
for stored chats after a reload; numbers that are not sources stay plain text."""

from __future__ import annotations

from playwright.sync_api import expect

from memory.store import StoredMessage
from tests import files
from tests.browser import open_panel
from tests.browser.test_chat_urls import CHAT_ID, chat_in_url, loaded
from tests.browser.test_sessions_ui import BOT, open_page, send


def test_an_inline_citation_opens_its_passage_after_a_reload(browser, live_server, services, artifacts, tmp_path):
    pdf = tmp_path / "story.pdf"
    pdf.write_bytes(files.pdf_bytes())
    page = open_page(browser, live_server.url)
    open_panel(page, "files-panel")
    page.locator("#file-upload input[type='file']").set_input_files(str(pdf))
    expect(page.locator("#files-table")).to_contain_text("story.pdf", timeout=30_000)
    expect(page.locator("#files-table")).to_contain_text("ready", timeout=90_000)
    send(page, "Who wrote down every storm in a notebook?")
    expect(page.locator(BOT).last).to_contain_text("Sources: [1] story.pdf, page 2")
    expect(page).to_have_url(CHAT_ID)

    # the model may or may not cite by itself: a turn that cites [1] and [2] with the real answer's
    # passages, the last of them given twice (its two numbers are one entry), as a model's turn is stored
    sid = chat_in_url(page)
    user = services.store._kv.get(f"s:{sid}")["user"]  # this browser's user
    sources = services.store.messages(user, sid)[-1].meta["sources"]
    last = len(sources)
    assert 1 <= last < 8
    sources = sources + [dict(sources[-1], score=0.1)]  # [last + 1]: the same passage as [last]
    entries = len({(s["source"], s["excerpt"]) for s in sources})
    services.store.append(user, sid, [
        StoredMessage("user", "Where is that written?"),
        StoredMessage("assistant", f"Maren kept the log [1], in **green** ink [1, 2]; see also [{last}]"
                                   f"[{last + 1}] and [9]. Not a citation: `list[1]`.",
                      meta={"sources": sources, "model": "smollm2-135m"})])

    page.reload()
    loaded(page)
    answer = page.locator(BOT).last
    expect(answer).to_contain_text("Maren kept the log")
    cites = answer.locator("a.shoal-cite")
    expect(cites).to_have_count(5)
    assert [t.strip() for t in cites.all_inner_texts()] == ["[1]", "1", "2", f"[{last}]", f"[{last + 1}]"]
    expect(answer).to_contain_text("and [9].")  # not a source: plain text
    expect(answer.locator("strong")).to_have_text("green")  # the rest is still the model's Markdown
    expect(answer.locator("code")).to_have_text("list[1]")
    hrefs = [cites.nth(i).get_attribute("href") for i in range(5)]
    assert hrefs[0] == hrefs[1] and hrefs[3] == hrefs[4]  # a passage given twice: both numbers open its entry
    expect(answer.locator("details .shoal-source")).to_have_count(entries)

    passage = page.locator(hrefs[0])
    expect(passage).to_be_hidden()  # folded under the "Sources" line
    cites.first.click()
    expect(passage).to_be_visible()
    expect(passage).to_contain_text("story.pdf")
    expect(passage).to_contain_text("green notebook")
    expect(passage).to_contain_text("relevance")
    assert "#" not in page.url  # opened by the page's script, not by navigating to the fragment
    expect(page).to_have_url(CHAT_ID)
    page.wait_for_timeout(600)  # the scroll
    page.screenshot(path=str(artifacts / "citations.png"), full_page=True)

    # each answer's passages have ids of their own
    ids = page.locator(f"{BOT} details .shoal-source").evaluate_all("els => els.map(e => e.id)")
    assert len(ids) == len(set(ids)) > entries
