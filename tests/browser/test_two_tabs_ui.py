"""Two tabs of one user stay in step (issue 27, finding 9): a turn sent in one shows in the other
without a reload, and so does a chat made in one."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.test_sessions_ui import USER, send


def test_two_tabs_of_one_user_stay_in_step(browser, own_server, artifacts):
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # one browser: one user
    try:
        first = context.new_page()
        first.set_default_timeout(60_000)
        first.goto(own_server["server"].url)
        expect(first.locator("#ui-loaded")).to_have_text("loaded")
        send(first, "Say hi.")
        second = context.new_page()
        second.set_default_timeout(60_000)
        second.goto(first.url)  # the chat's own address
        expect(second.locator("#ui-loaded")).to_have_text("loaded")
        expect(second.locator(USER)).to_have_count(1)

        send(first, "Name one colour.")
        expect(second.locator(USER)).to_have_count(2, timeout=15_000)  # no reload
        expect(second.locator(USER).last).to_contain_text("Name one colour.")

        first.locator("#new-chat").click()
        expect(second.locator("#session-list label")).to_have_count(2, timeout=15_000)
        second.screenshot(path=str(artifacts / "chat-two-tabs.png"), full_page=True)
    finally:
        context.close()
