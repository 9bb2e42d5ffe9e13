"""Message versions (issue 27, finding 5): Edit and Regenerate of *any* message start a new version
of the chat from there, `‹ 2/2 ›` switches between versions (the model sees the chosen one), a
message's Delete deletes its turn with an Undo, and a message's Copy copies its text only."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from tests.browser.test_queue_ui import wait_idle
from tests.browser.test_sessions_ui import BOT, USER, open_page, send, text_of


def action(message, label: str):
    return message.locator("a.shoal-act", has_text=label)


def test_edit_and_regenerate_any_message_make_versions_to_switch_between(browser, own_server, pool, artifacts):
    page = open_page(browser, own_server["server"].url)
    send(page, "My name is Ada. Say hi.")
    send(page, "Name a fruit.")
    expect(page.locator(USER)).to_have_count(2)
    wait_idle(pool)  # (the figures line may still show the first reply's: the second must have ended)

    # Edit the FIRST message (not the last): the box gets it; sent, the chat goes on from there
    action(page.locator(USER).first, "Edit").click()
    box = page.locator("#chat-input textarea")
    expect(box).to_have_value("My name is Ada. Say hi.")
    expect(page.locator("#editing-note")).to_contain_text("new version")
    box.fill("My name is Grace. Say hi.")
    box.press("Enter")
    expect(page.locator(USER)).to_have_count(1, timeout=60_000)
    wait_idle(pool)
    expect(page.locator(USER).first).to_contain_text("My name is Grace.")
    expect(page.locator(USER).first.locator(".shoal-versions")).to_have_text("‹ 2/2 ›", timeout=30_000)

    # ‹ : the first version is back, whole (both its turns)
    page.locator(USER).first.locator("a.shoal-act[title='Previous version']").click()
    expect(page.locator(USER)).to_have_count(2)
    expect(page.locator(USER).first).to_contain_text("My name is Ada.")
    expect(page.locator(USER).first.locator(".shoal-versions")).to_have_text("‹ 1/2 ›")

    # Regenerate the first reply (not the last): a new version of it; the versions show on the reply
    first_reply = text_of(page.locator(BOT).first)
    action(page.locator(BOT).first, "Regenerate").click()
    expect(page.locator(USER)).to_have_count(1, timeout=60_000)
    wait_idle(pool)
    expect(page.locator(BOT).first.locator(".shoal-versions")).to_have_text("‹ 2/2 ›", timeout=30_000)
    page.screenshot(path=str(artifacts / "chat-versions.png"), full_page=True)

    page.reload()  # kept in the session
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    expect(page.locator(BOT).first.locator(".shoal-versions")).to_have_text("‹ 2/2 ›")
    page.locator(BOT).first.locator("a.shoal-act[title='Previous version']").click()
    expect(page.locator(BOT).first.locator(".shoal-versions")).to_have_text("‹ 1/2 ›")
    assert text_of(page.locator(BOT).first) == first_reply
    expect(page.locator(USER)).to_have_count(2)  # with the turn that followed it


def test_deleting_a_message_deletes_its_turn_with_an_undo_and_copy_takes_the_text_only(browser, own_server, pool):
    page = open_page(browser, own_server["server"].url)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    send(page, "Remember that my locker code is 7781.")
    send(page, "Name a colour.")
    wait_idle(pool)  # actions on a chat whose reply still streams are refused (a toast)
    action(page.locator(USER).first, "Delete").click()
    expect(page.locator(USER)).to_have_count(1)
    expect(page.locator(USER).first).to_contain_text("Name a colour.")
    page.reload()  # deleted from the store, not hidden
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    expect(page.locator(USER)).to_have_count(1)

    action(page.locator(USER).first, "Delete").click()
    expect(page.locator(USER)).to_have_count(0)
    page.locator("#undo-delete").click()  # the last delete, undone
    expect(page.locator(USER)).to_have_count(1)
    expect(page.locator("#undo-delete")).to_be_hidden()

    reply = page.locator(BOT).last
    reply.hover()
    page.locator("#chatbot").get_by_role("button", name="Copy message").last.click()  # the reply's
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.strip() and "shoal-act" not in copied and "Regenerate" not in copied
    # the reply as stored: its Markdown as the model wrote it (what a copy of a chat message gives)
    sid = parse_qs(urlparse(page.url).query)["chat"][0]
    store = own_server["services"].store
    stored = store.messages(store._kv.get(f"s:{sid}")["user"], sid)[-1].content
    assert copied.strip() == stored.strip()
