"""A URL per chat (?chat=<id>: reload and a second tab open it; another user's id is refused) and
the sidebar's search over chats, in headless Chromium. Chats get their messages straight from the
store (no model turn), so these tests are quick."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from memory.store import StoredMessage
from tests.browser.test_sessions_ui import BOT, USER, open_page, session_titles

CHAT_ID = re.compile(r"[?&]chat=([0-9a-f]{32})")


def chat_in_url(page: Page) -> str | None:
    found = CHAT_ID.search(page.url)
    return found.group(1) if found else None


def new_chat(page: Page, services, user_text: str, reply: str) -> str:
    """A new chat from the sidebar's button (its id comes in the address bar), its turn written to
    the store as a model's turn would be."""
    before = chat_in_url(page)
    page.locator("#new-chat").click()
    expect(page).to_have_url(CHAT_ID)
    if before:
        expect(page).not_to_have_url(re.compile(f"chat={before}"))
    sid = chat_in_url(page)
    user = services.store._kv.get(f"s:{sid}")["user"]  # this browser's user
    services.store.append(user, sid, [StoredMessage("user", user_text), StoredMessage("assistant", reply)])
    return sid


def search_for(page: Page, text: str) -> None:
    """Typed, as a person types: the box's input event comes from the keyboard (fill sends none)."""
    box = page.locator("#chat-search :is(input, textarea)").first
    box.click()
    box.press("Control+a")
    box.press("Backspace")
    if text:
        box.press_sequentially(text)
    expect(box).to_have_value(text)


def loaded(page: Page) -> None:
    expect(page.locator("#chat-input textarea")).to_be_visible()
    expect(page.locator("#ui-loaded")).to_have_text("loaded")


def test_a_chat_has_a_url_that_reload_and_a_second_tab_open_and_another_user_cannot(browser, own_server, artifacts):
    url, services = own_server["server"].url, own_server["services"]
    page = open_page(browser, url)
    assert chat_in_url(page) is None  # no chats yet
    older = new_chat(page, services, "Tell me about the ferry to Skerry.", "It leaves at nine.")
    newer = new_chat(page, services, "How do I bake sourdough?", "Slowly.")
    assert older != newer

    page.locator("#session-list label", has_text="ferry to Skerry").click()  # an older chat
    expect(page.locator(USER).first).to_contain_text("ferry to Skerry")
    expect(page).to_have_url(re.compile(f"[?&]chat={older}"))

    page.reload()  # the newer chat would be the default: the URL keeps this one
    loaded(page)
    expect(page.locator(USER).first).to_contain_text("ferry to Skerry")
    expect(page.locator(BOT).first).to_contain_text("leaves at nine")
    assert chat_in_url(page) == older

    tab = page.context.new_page()  # a second tab of the same browser: the same user
    tab.set_default_timeout(60_000)
    tab.goto(f"{url}/?chat={older}")
    loaded(tab)
    expect(tab.locator(USER).first).to_contain_text("ferry to Skerry")
    assert chat_in_url(tab) == older
    tab.close()

    theirs = open_page(browser, url)  # another browser context: another user
    secret = new_chat(theirs, services, "My secret plans for the moon base.", "Keep them safe.")
    page.goto(f"{url}/?chat={secret}")
    loaded(page)
    expect(page.get_by_text("That chat is not one of yours")).to_be_visible()
    expect(page.locator(USER).first).to_contain_text("sourdough")  # the usual view: my latest chat
    expect(page).to_have_url(re.compile(f"[?&]chat={newer}"))
    assert "moon base" not in page.locator("#chatbot").inner_text()
    assert not any("moon base" in t for t in session_titles(page))
    page.screenshot(path=str(artifacts / "chat-url.png"), full_page=True)

    theirs.goto(f"{url}/?chat={'0' * 32}")  # a chat nobody has: said alike
    loaded(theirs)
    expect(theirs.get_by_text("That chat is not one of yours")).to_be_visible()
    expect(theirs.locator(USER).first).to_contain_text("moon base")
    theirs.context.close()


def test_searching_chats_lists_only_those_whose_title_or_messages_match(browser, own_server, artifacts):
    url, services = own_server["server"].url, own_server["services"]
    page = open_page(browser, url)
    older = new_chat(page, services, "Tell me about ferries.", "The ferry to Skerry Island leaves at nine.")
    newer = new_chat(page, services, "How do I bake sourdough?", "Feed the starter, then wait.")
    page.reload()  # the chats' messages came through the store
    loaded(page)
    expect(page.locator("#session-list label")).to_have_count(2)

    search = page.locator("#chat-search :is(input, textarea)").first
    expect(search).to_have_attribute("placeholder", "Search chats")
    search_for(page, "SKERRY")  # a word of the older chat's reply, not of its title, in another case
    expect(page.locator("#session-list label")).to_have_text(["Tell me about ferries."])
    assert chat_in_url(page) == newer  # searching opens nothing: the open chat stays open
    expect(page.locator(USER).first).to_contain_text("sourdough")
    page.screenshot(path=str(artifacts / "chat-search.png"), full_page=True)

    search_for(page, "bake")
    expect(page.locator("#session-list label")).to_have_text(["How do I bake sourdough?"])
    search_for(page, "%")  # LIKE's wildcards are plain text
    expect(page.locator("#session-list label")).to_have_count(0)
    search_for(page, "")
    expect(page.locator("#session-list label")).to_have_count(2)

    search_for(page, "skerry")
    expect(page.locator("#session-list label")).to_have_text(["Tell me about ferries."])
    page.locator("#session-list label", has_text="ferries").click()  # a result opens; the search ends
    expect(page.locator(USER).first).to_contain_text("ferries")
    expect(page).to_have_url(re.compile(f"[?&]chat={older}"))
    expect(search).to_have_value("")
    expect(page.locator("#session-list label")).to_have_count(2)
