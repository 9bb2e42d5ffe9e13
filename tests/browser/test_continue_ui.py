"""Continue (issue 27, finding 5): a reply cut by its token limit or by Stop goes on from where it
ended, in place (one reply, longer), and stays so after a reload; a reply that was not cut has
nothing to continue (a toast, nothing changes)."""

from __future__ import annotations

import time

from playwright.sync_api import expect

from tests.browser.test_queue_ui import long_replies, wait_idle
from tests.browser.test_sessions_ui import BOT, USER, open_page, send


def test_continue_extends_a_cut_reply_in_place(browser, own_server, pool, artifacts):
    page = open_page(browser, own_server["server"].url)
    long_replies(page, 24)  # the reply stops at its token limit
    send(page, "Write a long story about a lighthouse keeper named Marta.")
    expect(page.locator("#reply-figures")).to_contain_text("length")
    cut = page.locator(BOT).last.inner_text().strip()
    page.locator("#continue").click()
    deadline = time.monotonic() + 60
    while len(page.locator(BOT).last.inner_text().strip()) <= len(cut) + 5 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    wait_idle(pool)
    expect(page.locator(BOT)).to_have_count(1)  # the same reply, longer: not a new one
    expect(page.locator(USER)).to_have_count(1)
    page.screenshot(path=str(artifacts / "chat-continued.png"), full_page=True)
    page.reload()
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    expect(page.locator(BOT)).to_have_count(1)
    longer = page.locator(BOT).last.inner_text().strip()
    assert longer.startswith(cut[:40]) and len(longer) > len(cut) + 5  # stored as one reply


def test_a_reply_that_was_not_cut_has_nothing_to_continue(browser, own_server):
    page = open_page(browser, own_server["server"].url)
    send(page, "What is two plus two? Answer with a number only.")
    expect(page.locator("#reply-figures")).to_contain_text("stop")
    before = page.locator(BOT).last.inner_text()
    page.locator("#continue").click()
    expect(page.get_by_text("Nothing to continue: the last reply was not cut short.")).to_be_visible()
    page.wait_for_timeout(1000)
    assert page.locator(BOT).last.inner_text() == before
