"""Files and export/import in the browser: upload into a chat, watch it become ready, get an
answer that shows its source; export a chat and import it back as a new one."""

from __future__ import annotations

import json

from playwright.sync_api import expect

from tests import files
from tests.browser import open_panel
from tests.browser.test_sessions_ui import BOT, open_page, send, session_titles


def test_upload_a_file_and_see_the_answer_cite_it(browser, live_server, artifacts, tmp_path):
    pdf = tmp_path / "story.pdf"
    pdf.write_bytes(files.pdf_bytes())
    page = open_page(browser, live_server.url)
    open_panel(page, "files-panel")
    page.locator("#file-upload input[type='file']").set_input_files(str(pdf))
    expect(page.locator("#files-table")).to_contain_text("story.pdf", timeout=30_000)
    expect(page.locator("#files-table")).to_contain_text("ready", timeout=90_000)
    send(page, "Who wrote down every storm in a notebook?")
    expect(page.locator(BOT).last).to_contain_text("Sources: [1] story.pdf, page 2")
    passage = page.locator(BOT).last.locator("details p").first
    expect(passage).to_be_hidden()  # folded under the sources line
    page.locator(BOT).last.locator("details summary").click()  # a source opens to its passage
    expect(passage).to_contain_text("green notebook")
    expect(passage).to_contain_text("relevance")
    page.screenshot(path=str(artifacts / "files.png"), full_page=True)


def test_a_file_that_takes_a_while_shows_ready_without_a_reload(browser, live_server, tmp_path):
    """The table followed a long file's progress and then stopped looking before it said ready."""
    notes = tmp_path / "logbook.txt"
    notes.write_text("".join(f"Entry {i}: the tide at the pier was {i % 7} metres, wind {i % 5} from the "
                             f"{['north', 'east', 'south', 'west'][i % 4]}, and the keeper noted gull number {i}.\n"
                             for i in range(2500)))
    page = open_page(browser, live_server.url)
    open_panel(page, "files-panel")
    page.locator("#file-upload input[type='file']").set_input_files(str(notes))
    table = page.locator("#files-table")
    expect(table).to_contain_text("logbook.txt", timeout=30_000)
    expect(table).to_contain_text("ready", timeout=180_000)


def test_export_then_import_a_chat(browser, live_server, artifacts, tmp_path):
    page = open_page(browser, live_server.url)
    send(page, "Say hello to the export test.")
    open_panel(page, "manage-chat")
    page.locator("#export").click()
    links = page.locator("#exported a")
    expect(links).to_have_count(2, timeout=30_000)
    with page.expect_download() as download_info:
        page.locator("#exported a[download$='.json']").first.click()
    exported = tmp_path / "chat.json"
    download_info.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["format"] == "shoal-session/1" and data["messages"][0]["content"] == "Say hello to the export test."
    before = len(session_titles(page))
    with page.expect_file_chooser() as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(exported))
    expect(page.locator("#session-list label")).to_have_count(before + 1, timeout=30_000)
    expect(page.locator("#chatbot [data-testid='user']").first).to_contain_text("Say hello to the export test.")


def test_asking_while_a_file_is_being_read_says_so_at_once(browser, live_server, tmp_path):
    """Before, the page waited up to 30 s without a word; now a note names the file and its state at
    once (the message waits for the file, so that the answer can use it) and "Ask now" goes on
    without it."""
    notes = tmp_path / "harbour-log.txt"
    notes.write_text("".join(f"Entry {i}: the harbour master counted {i % 9} boats and {i % 4} gulls.\n"
                             for i in range(3000)))
    page = open_page(browser, live_server.url)
    open_panel(page, "files-panel")
    page.locator("#file-upload input[type='file']").set_input_files(str(notes))
    expect(page.locator("#files-table")).to_contain_text("harbour-log.txt", timeout=30_000)
    box = page.locator("#chat-input textarea")
    box.fill("How many boats did the harbour master count in entry 7?")
    box.press("Enter")
    expect(page.get_by_text("Still reading harbour-log.txt")).to_be_visible(timeout=5_000)
    # ... and offers not to wait: "Ask now" answers from what is ready
    page.locator("#ask-now").click(timeout=10_000)
    expect(page.locator(BOT)).to_have_count(1, timeout=60_000)
    expect(page.locator("#ask-now")).to_be_hidden()
    expect(page.locator("#files-table")).to_contain_text("ready", timeout=180_000)
