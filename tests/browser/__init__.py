"""Helpers for the browser tests."""

from __future__ import annotations

from playwright.sync_api import Page

FRAMES = ("() => new Promise(done => { let n = 4; "
          "const next = () => --n ? requestAnimationFrame(next) : done(); requestAnimationFrame(next); })")


def open_panel(page: Page, elem_id: str) -> None:
    """Open a folded panel (gr.Accordion) and wait until its contents are whole.

    Gradio renders a closed accordion's contents only when it is first opened, and only a frame
    later gives them the values events sent while they were hidden (this page's session and
    settings): a field filled in between lost its text, about once in two CI runs under load
    (the tools chat then went out without tools). A person cannot type within that frame.
    """
    page.locator(f"#{elem_id} .label-wrap").first.click()
    page.locator(f"#{elem_id} [data-testid='accordion-content'] :is(input, textarea, button)").first.wait_for()
    page.evaluate(FRAMES)  # the values come at most two frames after the fields appear
