"""A chat in the browser that calls an MCP server's tool: the user ticks the operator's "vault"
server for this chat, asks, and sees the call, its result and the answer made from it; the steps
stay in the chat after a reload."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser import open_panel
from tests.conftest import make_settings, serve
from tests.server.test_mcp import ASK, OSLO, mcp_config


def test_a_chat_calls_an_mcp_tool_and_answers_from_its_result(page, pool, embedder, tmp_path, artifacts):
    from service import build_services
    settings = make_settings(tmp_path / "data", mcp_config=mcp_config(tmp_path, "vault_code"))
    services = build_services(settings, pool=pool, embedder=embedder)
    server = serve(services)
    try:
        page.goto(server.url)
        expect(page.locator("#ui-loaded")).to_have_text("loaded")
        open_panel(page, "params")
        page.locator("#mcp-servers").get_by_label("vault").check()
        page.locator("#tool-choice").get_by_label("required").check()
        temperature = page.locator("#temperature input[type='number']")
        temperature.fill("0")  # greedy: the small model's answer from the result is then the same each run
        temperature.press("Enter")
        box = page.locator("#chat-input textarea")
        box.fill(ASK)
        box.press("Enter")
        chat = page.locator("#chatbot")
        expect(chat.get_by_text("Called vault_code on MCP server vault")).to_be_visible(timeout=120_000)
        expect(chat.get_by_text("Result of vault_code")).to_be_visible(timeout=120_000)
        expect(page.locator("#reply-figures")).to_contain_text("tok/s", timeout=120_000)
        answer = chat.locator("[data-testid='bot']").last.inner_text()
        page.screenshot(path=str(artifacts / "mcp-chat.png"), full_page=True)
        assert OSLO in answer
        page.reload()
        expect(page.locator("#ui-loaded")).to_have_text("loaded")
        expect(page.locator("#chatbot").get_by_text("Called vault_code on MCP server vault")).to_be_visible()
        expect(page.locator("#chatbot [data-testid='bot']").last).to_contain_text(OSLO)
    finally:
        server.stop()
        services.mcp.close()
