"""The API's own pages work offline: /docs (Swagger UI) and /redoc load their scripts from Shoal,
not from a CDN, so a browser that reaches nothing but this server sees the routes listed."""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.sync_api import expect


def test_docs_and_redoc_render_with_nothing_but_this_server(page, live_server, artifacts):
    elsewhere = []

    def only_here(route):
        if urlsplit(route.request.url).hostname not in ("127.0.0.1", "localhost"):
            if route.request.resource_type != "image":  # ReDoc's "by Redocly" logo comes from its CDN
                elsewhere.append(route.request.url)
            return route.abort()
        return route.continue_()

    page.route("**/*", only_here)
    page.goto(f"{live_server.url}/docs")
    expect(page.get_by_text("/v1/chat/completions").first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("/v1/responses").first).to_be_visible()
    page.screenshot(path=str(artifacts / "docs.png"))
    page.goto(f"{live_server.url}/redoc")
    expect(page.get_by_role("heading", name="Create a response (OpenAI Responses API)").first).to_be_visible(
        timeout=30_000)
    page.screenshot(path=str(artifacts / "redoc.png"))
    assert elsewhere == []  # no script, style, font or data came from anywhere else
