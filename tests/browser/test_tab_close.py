"""A browser tab closed mid-reply stops the generation (the fourth transport of the faults list)."""

from __future__ import annotations

import time

from tests.browser import open_panel
from tests.browser.test_sessions_ui import open_page
from tests.hardening.test_faults import wait_idle


def test_browser_tab_closed_mid_reply_stops_generation(browser, live_server, pool):
    page = open_page(browser, live_server.url)
    open_panel(page, "params")
    page.locator("#max-new-tokens input").fill("1500")
    box = page.locator("#chat-input textarea")
    box.fill("Write a very long story about a lighthouse keeper.")
    box.press("Enter")
    page.locator("#chatbot [data-testid='bot']").last.wait_for()
    deadline = time.monotonic() + 30
    while not pool.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.in_flight() == 1
    page.context.close()
    assert wait_idle(pool, 5) < 2.0  # Gradio notices the closed tab, then the handle is cancelled
