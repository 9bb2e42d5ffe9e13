"""Streaming never locks the page (issue 27, finding 1), in headless Chromium: messages sent while
a reply streams are queued visibly and answered in order (also after a reload); a queued message
can be removed or taken back to the box; switching chats while a reply streams shows the other
chat, and the reply, which went on server-side, is there on coming back."""

from __future__ import annotations

import time

from playwright.sync_api import Page, expect

from tests.browser import open_panel
from tests.browser.test_sessions_ui import BOT, USER, open_page, send, text_of

LONG = "Write a very long story about a lighthouse keeper and the ships she saw."


def long_replies(page: Page, tokens: int = 500) -> None:
    open_panel(page, "params")
    page.locator("#params").get_by_label("Max new tokens").fill(str(tokens))
    page.locator("#chat-input textarea").click()


def queue(page: Page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")
    expect(box).to_have_value("")  # taken at once, even while the reply streams


def wait_idle(pool, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while pool.generating() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_messages_sent_while_a_reply_streams_are_queued_and_answered_in_order(browser, own_server, artifacts):
    page = open_page(browser, own_server["server"].url)
    long_replies(page)
    send(page, LONG, wait=False)
    expect(page.locator(BOT).last).not_to_have_text("", timeout=60_000)  # streaming now
    queue(page, "What is two plus two?")
    queue(page, "Name one colour.")
    expect(page.locator("#queue-row")).to_be_visible()
    expect(page.locator("#queue-pick input")).to_have_value("1. What is two plus two?")
    page.screenshot(path=str(artifacts / "chat-queued.png"), full_page=True)
    expect(page.locator(USER)).to_have_count(3, timeout=180_000)  # each sent when the one before ended
    expect(page.locator(BOT)).to_have_count(3, timeout=180_000)
    expect(page.locator("#queue-row")).to_be_hidden(timeout=180_000)
    expect(page.locator("#reply-figures")).to_contain_text("tok/s", timeout=180_000)
    asked = [LONG, "What is two plus two?", "Name one colour."]
    assert [text_of(m).strip() for m in page.locator(USER).all()] == asked
    page.reload()
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    expect(page.locator(USER)).to_have_count(3)
    assert [text_of(m).strip() for m in page.locator(USER).all()] == asked  # stored, in order
    assert all(text_of(m).strip() for m in page.locator(BOT).all())


def test_a_queued_message_can_be_removed_or_taken_back_to_edit(browser, own_server, pool):
    page = open_page(browser, own_server["server"].url)
    long_replies(page, 600)  # the reply outlasts the four clicks below
    send(page, LONG, wait=False)
    expect(page.locator(BOT).last).not_to_have_text("", timeout=60_000)
    queue(page, "A question I no longer want.")
    queue(page, "A question to rewrite.")
    page.locator("#queue-remove").click()  # the selected one: the first
    expect(page.locator("#queue-pick input")).to_have_value("1. A question to rewrite.")
    page.locator("#queue-edit").click()
    box = page.locator("#chat-input textarea")
    expect(box).to_have_value("A question to rewrite.")  # back in the box, out of the queue
    expect(page.locator("#queue-row")).to_be_hidden()
    wait_idle(pool)
    page.wait_for_timeout(1000)
    expect(page.locator(USER)).to_have_count(1)  # neither was sent
    box.fill("A question, rewritten: what is two plus two?")
    box.press("Enter")
    expect(page.locator(USER)).to_have_count(2)
    expect(page.locator("#reply-figures")).to_contain_text("tok/s", timeout=120_000)


def test_switching_chats_while_a_reply_streams_shows_the_other_chat(browser, own_server, pool, artifacts):
    page = open_page(browser, own_server["server"].url)
    send(page, "Say hi.")
    page.locator("#new-chat").click()
    expect(page.locator(BOT)).to_have_count(0)
    long_replies(page)
    send(page, LONG, wait=False)
    expect(page.locator(BOT).last).not_to_have_text("", timeout=60_000)
    page.locator("#session-list label", has_text="Say hi").click()  # away, mid-reply
    expect(page.locator(USER)).to_have_count(1)
    expect(page.locator(USER)).to_contain_text(["Say hi."])
    page.wait_for_timeout(2000)  # the other chat's reply keeps streaming, but not over this one
    expect(page.locator(USER)).to_have_count(1)
    expect(page.locator(USER)).to_contain_text(["Say hi."])
    page.screenshot(path=str(artifacts / "chat-switched-while-streaming.png"), full_page=True)
    wait_idle(pool)
    page.reload()  # the list names the chat by its first message once the reply is stored
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    page.locator("#session-list label", has_text="very long story").click()  # back
    expect(page.locator(USER)).to_have_count(1)
    expect(page.locator(BOT)).to_have_count(1)
    # the whole reply was stored meanwhile: it ended by itself (or at its limit), it was not cut
    expect(page.locator("#reply-figures")).to_contain_text("tok/s")
    assert any(f" · {reason}" in page.locator("#reply-figures").inner_text() for reason in ("stop", "length"))
    assert len(text_of(page.locator(BOT).last).strip()) > 40
