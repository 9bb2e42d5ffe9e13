"""The chat UI in headless Chromium: streamed replies, stop, sessions (create, switch, rename,
delete), persistence across a reload and a server restart, and isolation between browsers."""

from __future__ import annotations

import re
import time

from playwright.sync_api import Page, expect

from tests.browser import open_panel

BOT = "#chatbot [data-testid='bot']"
USER = "#chatbot [data-testid='user']"


def send(page: Page, text: str, wait: bool = True) -> None:
    bots = page.locator(BOT).count()
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")
    expect(page.locator(BOT)).to_have_count(bots + 1, timeout=60_000)
    if wait:
        expect(page.locator("#reply-figures")).to_contain_text("tok/s", timeout=120_000)
        # (the figures may still be the last reply's): the reply ended once it is drawn as stored,
        # with the actions line under it
        expect(page.locator(BOT).last.locator(".shoal-actions")).to_have_count(1, timeout=120_000)


def text_of(message) -> str:
    """A message's text without the actions line under it (Edit, Regenerate, Delete, ‹ 2/3 ›)."""
    return message.evaluate("e => { const c = e.cloneNode(true); "
                            "c.querySelectorAll('.shoal-actions').forEach(a => a.remove()); return c.textContent; }")


def session_titles(page: Page) -> list[str]:
    return [t.strip() for t in page.locator("#session-list label").all_inner_texts()]


def open_page(browser, url: str, width: int = 1280) -> Page:
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    expect(page.locator("#chat-input textarea")).to_be_visible()
    expect(page.locator("#ui-loaded")).to_have_text("loaded")  # this browser's sessions are in
    return page


def test_streamed_reply_then_stop_mid_reply_keeps_the_partial_answer(browser, own_server, artifacts, pool):
    url = own_server["server"].url
    page = open_page(browser, url)
    open_panel(page, "params")
    page.locator("#max-new-tokens input").fill("600")
    send(page, "Write a very long story about a lighthouse keeper.", wait=False)
    reply = page.locator(BOT).last
    expect(reply).not_to_have_text("", timeout=60_000)
    page.wait_for_timeout(800)
    page.locator("#stop").click()
    expect(page.locator("#reply-figures")).to_contain_text("tok/s")  # the cut reply's figures, once stored
    expect(page.locator("#reply-figures")).to_contain_text("cancelled")
    frozen = reply.inner_text()
    page.wait_for_timeout(4000)  # longer than the page's tick, which draws what another tab changed
    assert reply.inner_text() == frozen  # nothing more arrives after Stop
    deadline = time.monotonic() + 5
    while pool.status("smollm2-135m")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.status("smollm2-135m")["in_flight"] == 0  # the generation really stopped
    page.screenshot(path=str(artifacts / "chat-stopped.png"), full_page=True)
    page.reload()
    expect(page.locator(BOT).last).to_have_text(frozen, timeout=30_000)  # the partial reply was kept, as shown


def test_sessions_create_switch_rename_delete_and_survive_reload_and_restart(browser, own_server, artifacts):
    page = open_page(browser, own_server["server"].url)
    send(page, "What is the capital of France? Answer in one word.")
    expect(page.locator("#session-list label")).to_have_count(1)
    first_title = session_titles(page)[0]
    assert "capital of France" in first_title

    page.locator("#new-chat").click()
    expect(page.locator(BOT)).to_have_count(0)
    send(page, "Name three colours.")
    expect(page.locator("#session-list label")).to_have_count(2)

    page.locator("#session-list label", has_text="capital of France").click()  # switch back
    expect(page.locator(USER).first).to_contain_text("capital of France")
    expect(page.locator(USER)).to_have_count(1)

    open_panel(page, "manage-chat")
    page.locator("#rename-box input, #rename-box textarea").first.fill("Geography")
    page.locator("#rename").click()
    expect(page.locator("#session-list label", has_text="Geography")).to_have_count(1)
    page.screenshot(path=str(artifacts / "sessions.png"), full_page=True)

    page.reload()
    expect(page.locator("#session-list label")).to_have_count(2)
    assert "Geography" in session_titles(page)

    own_server["stop"]()
    own_server["start"]()
    page.reload()
    expect(page.locator("#session-list label")).to_have_count(2)
    page.locator("#session-list label", has_text="Geography").click()
    expect(page.locator(USER).first).to_contain_text("capital of France")

    open_panel(page, "manage-chat")
    page.locator("#delete-chat").click()
    page.locator("#confirm-delete").click()
    expect(page.locator("#session-list label")).to_have_count(1)
    assert "Geography" not in session_titles(page)


def test_a_new_chat_starts_from_the_defaults_unless_asked_to_keep_this_chats_settings(browser, own_server, artifacts):
    page = open_page(browser, own_server["server"].url)
    open_panel(page, "params")
    page.locator("#system-prompt textarea").fill("You are a pirate.")
    temperature = page.locator("#temperature input[type='number']")
    temperature.fill("1.5")
    temperature.press("Enter")
    send(page, "Hello there.")

    page.locator("#new-chat").click()  # a fresh chat: nothing carried over
    expect(page.locator(BOT)).to_have_count(0)
    expect(page.locator("#system-prompt textarea")).to_have_value("")
    expect(temperature).not_to_have_value("1.5")
    send(page, "Name a colour.")
    expect(page.locator("#system-prompt textarea")).to_have_value("")  # the colour chat is stored without it

    page.locator("#session-list label", has_text="Hello there").click()
    expect(page.locator("#system-prompt textarea")).to_have_value("You are a pirate.")
    page.locator("#same-settings input").check()  # asked for: the new chat takes this chat's settings
    page.locator("#new-chat").click()
    expect(page.locator(BOT)).to_have_count(0)
    expect(page.locator("#system-prompt textarea")).to_have_value("You are a pirate.")
    expect(temperature).to_have_value("1.5")
    page.screenshot(path=str(artifacts / "new-chat-same-settings.png"), full_page=True)


def test_a_draft_typed_while_a_reply_streams_is_kept(browser, own_server):
    page = open_page(browser, own_server["server"].url)
    send(page, "Write a short story about a lighthouse.", wait=False)
    expect(page.locator(BOT).last).not_to_have_text("", timeout=60_000)  # it streams
    box = page.locator("#chat-input textarea")
    box.press_sequentially("my next question")  # typed while tokens arrive
    expect(page.locator("#reply-figures")).to_contain_text("tok/s", timeout=120_000)
    expect(box).to_have_value("my next question")  # neither a token's update nor the end wiped it


def test_the_chats_trash_icon_deletes_its_messages_for_good(browser, own_server):
    page = open_page(browser, own_server["server"].url)
    send(page, "Remember that my locker code is 7781.")
    page.locator("#chatbot").get_by_role("button", name=re.compile("clear", re.I)).click()
    expect(page.locator(BOT)).to_have_count(0)
    page.reload()  # not hidden: gone from the store, so a reload does not bring them back
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    expect(page.locator("#session-list label")).to_have_count(1)  # the chat itself stays
    expect(page.locator(USER)).to_have_count(0)
    assert page.locator(BOT).count() == 0


def test_another_browser_does_not_see_my_sessions(browser, own_server):
    mine = open_page(browser, own_server["server"].url)
    send(mine, "My private question about tides.")
    expect(mine.locator("#session-list label")).to_have_count(1)
    theirs = open_page(browser, own_server["server"].url)
    expect(theirs.locator("#session-list label")).to_have_count(0)
    assert theirs.locator(BOT).count() == 0


def test_shift_enter_is_a_newline_and_the_api_page_lists_named_endpoints(browser, own_server, artifacts):
    page = open_page(browser, own_server["server"].url)
    box = page.locator("#chat-input textarea")
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"  # not sent
    assert page.locator(USER).count() == 0
    page.get_by_text("Use via API").click()
    expect(page.get_by_text("/list_sessions").first).to_be_visible()
    expect(page.get_by_text("/chat", exact=True).first).to_be_visible()
    page.screenshot(path=str(artifacts / "api-page.png"))


def test_phone_width_starts_with_the_chat_not_the_sidebar(browser, own_server, artifacts):
    page = open_page(browser, own_server["server"].url, width=390)
    page.wait_for_timeout(800)
    expect(page.locator("#chat-input textarea")).to_be_in_viewport()
    send(page, "Hello!")
    page.screenshot(path=str(artifacts / "phone.png"), full_page=True)
