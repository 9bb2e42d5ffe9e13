"""A user in a real browser chats with SmolLM2 (streamed) and completes text with Gemma."""

from __future__ import annotations

import time

from playwright.sync_api import expect

from tests.browser import FRAMES, open_panel
from tests.browser.test_sessions_ui import text_of


def test_completion_tab_continues_text_with_the_base_model(page, live_server, artifacts):
    page.goto(live_server.url)
    page.get_by_role("tab", name="Complete").click()
    page.locator("#complete-model input").click()  # only models that write text are offered
    page.get_by_role("option").first.wait_for()
    offered = [t.replace("✓", "").strip() for t in page.get_by_role("option").all_inner_texts()]
    assert "gemma3-270m" in offered and not any("minilm" in name for name in offered), offered
    page.keyboard.press("Escape")
    page.locator("#complete-prompt textarea").fill("The capital of France is")
    page.locator("#complete-go").click()
    output = page.locator("#complete-output textarea")
    expect(output).not_to_have_value("", timeout=180_000)
    expect(page.locator("#complete-model-status")).to_contain_text("ready")  # its state line, as the chat's
    page.screenshot(path=str(artifacts / "complete.png"), full_page=True)


def test_chat_in_the_browser_streams_a_reply(page, live_server, artifacts):
    page.goto(live_server.url)
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    box = page.locator("#chat-input textarea")
    box.fill("What is the capital of France? Answer in one word.")
    box.press("Enter")
    reply = page.locator("#chatbot [data-testid='bot']").last
    figures = page.locator("#reply-figures")
    lengths = set()
    deadline = time.monotonic() + 90
    while "tok/s" not in figures.inner_text() and time.monotonic() < deadline:
        if reply.count():
            lengths.add(len(reply.inner_text()))
        time.sleep(0.05)
    expect(figures).to_contain_text("tok/s")
    assert len([n for n in lengths if n > 0]) >= 2  # the reply grew while we watched
    assert len(reply.inner_text().strip()) > 0
    assert box.input_value() == ""  # Enter sent the message and cleared the box
    page.screenshot(path=str(artifacts / "chat.png"), full_page=True)


def test_a_page_opened_after_a_model_loaded_shows_it_ready_at_once(page, pool, embedder, tmp_path_factory):
    """The finding: a page opened after the model became ready still said "unloaded" (the page
    carried the state from when the UI was built) until a timer caught up."""
    from service import build_services
    from tests.conftest import BASE_MODEL, make_settings, serve
    pool.unload(BASE_MODEL)
    server = serve(build_services(make_settings(tmp_path_factory.mktemp("late")), pool=pool, embedder=embedder))
    try:
        pool.load(BASE_MODEL)
        page.goto(server.url)
        expect(page.locator("#ui-loaded")).to_have_text("loaded")
        page.get_by_role("tab", name="Models").click()
        row = page.locator("#model-table tr", has_text=BASE_MODEL)
        assert row.locator(".state-ready").count() == 1, row.inner_text()  # at once, not after a tick
        assert "llama.cpp" in row.inner_text()  # each version shows the engine that runs it
        other = page.locator("#model-table tr", has_text="base-transformers")
        assert "transformers" in other.inner_text() and "unloaded" in other.inner_text()
    finally:
        server.stop()
        pool.unload(BASE_MODEL)


def test_json_output_toggle_makes_the_reply_valid_json_of_the_schema(page, live_server, artifacts):
    import json

    import jsonschema
    schema = {"type": "object", "properties": {"animal": {"type": "string", "maxLength": 20},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 10}},
              "required": ["animal", "legs"], "additionalProperties": False}
    page.goto(live_server.url)
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    open_panel(page, "params")
    page.locator("#json-output input[type='checkbox']").check()
    page.locator("#json-schema textarea").fill(json.dumps(schema))
    box = page.locator("#chat-input textarea")
    box.fill("Tell me about cats.")
    box.press("Enter")
    expect(page.locator("#reply-figures")).to_contain_text("tok/s", timeout=90_000)
    reply = text_of(page.locator("#chatbot [data-testid='bot']").last).strip()
    page.screenshot(path=str(artifacts / "json-output.png"), full_page=True)
    jsonschema.validate(json.loads(reply), schema)


def test_a_chat_with_tools_shows_the_call_and_answers_from_its_result(page, live_server, artifacts):
    import json

    import jsonschema
    parameters = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                  "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                               "parameters": parameters}}]
    page.goto(live_server.url)
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    open_panel(page, "params")
    page.locator("#tools textarea").fill(json.dumps(tools))
    page.locator("#tool-choice").get_by_label("required").check()
    box = page.locator("#chat-input textarea")
    box.fill("What is the weather like in Paris?")
    box.press("Enter")
    chat = page.locator("#chatbot")
    expect(chat.get_by_text("Called get_weather")).to_be_visible(timeout=90_000)
    expect(page.locator("#reply-figures")).to_contain_text("tok/s", timeout=90_000)
    arguments = chat.locator("code").last.inner_text()  # the call's arguments, shown as JSON
    jsonschema.validate(json.loads(arguments), parameters)
    box.fill("31 degrees, sunny")
    box.press("Enter")
    expect(chat.get_by_text("Result of get_weather")).to_be_visible(timeout=90_000)
    expect(page.locator("#reply-figures")).to_contain_text("tok/s", timeout=90_000)
    reply = page.locator("#chatbot [data-testid='bot']").last
    expect(reply).not_to_have_text("", timeout=90_000)
    page.screenshot(path=str(artifacts / "tool-call.png"), full_page=True)
    assert "Called get_weather" not in reply.inner_text()  # the answer is words, not another call


def test_an_empty_message_is_a_toast_not_an_error_over_the_page(page, live_server):
    page.goto(live_server.url)
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    box = page.locator("#chat-input textarea")
    box.press("Enter")
    expect(page.get_by_text("Write a message first.")).to_be_visible()
    page.evaluate(FRAMES)
    # no error status laid over the chat, the chat list or the box, and typing goes on
    expect(page.locator("#chatbot .error, #session-list .error, #chat-input .error")).to_have_count(0)
    box.fill("typing still works")
    expect(box).to_have_value("typing still works")


def test_the_page_names_the_api_and_its_docs(page, live_server):
    page.goto(live_server.url)
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    note = page.locator("#api-note")
    expect(note).to_contain_text("/v1/chat/completions")
    expect(note).to_contain_text("/v1/messages")
    assert note.locator("a").first.get_attribute("href") == "/docs"
    expect(page.locator("#shoal-base-url")).to_have_text(f"{live_server.url}/v1")  # for the OpenAI SDKs
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    note.locator("a.shoal-copy-base").click()
    expect(note.locator("a.shoal-copy-base")).to_have_text("copied")
    assert page.evaluate("navigator.clipboard.readText()") == f"{live_server.url}/v1"


def test_on_a_phone_the_models_table_scrolls_to_its_state_column(browser, live_server, artifacts):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(live_server.url)
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    page.get_by_role("tab", name="Models").click()
    expect(page.locator("#model-table td", has_text="ready").first).to_be_attached()
    widths = page.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths  # the page itself does not run off the screen: the table scrolls
    state = page.locator("#model-table td", has_text="ready").first
    state.scroll_into_view_if_needed()
    box = state.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box  # reachable on screen
    page.screenshot(path=str(artifacts / "models-phone.png"))
    context.close()


def test_a_parameter_out_of_range_is_named_once_and_the_message_waits_for_it(browser, own_server, artifacts):
    from tests.browser.test_sessions_ui import BOT, open_page, send

    page = open_page(browser, own_server["server"].url)
    send(page, "Say hi.")  # a chat whose settings are saved as they change
    open_panel(page, "params")
    top_p = page.locator("#top-p input[type='number']")
    top_p.fill("600")
    top_p.press("Tab")
    toasts = page.locator(".toast-body")  # (each toast lasts a while: they are counted)
    expect(toasts.filter(has_text="Top p:")).to_have_count(1)  # the field, by its label, once
    page.evaluate(FRAMES)
    expect(toasts.filter(has_text="Top p:")).to_have_count(1)
    expect(page.get_by_text("greater than maximum")).to_have_count(0)  # not Gradio's nameless error
    expect(page.locator("#chatbot .error, #session-list .error, #chat-input .error, #params .error")).to_have_count(0)

    expect(top_p).to_have_value("1")  # and the slider's box goes back into its range

    max_new = page.locator("#max-new-tokens input")
    max_new.fill("0")
    max_new.press("Tab")
    expect(toasts.filter(has_text="Max new tokens:")).to_have_count(1)
    box = page.locator("#chat-input textarea")
    box.fill("Name a colour.")
    box.press("Enter")  # refused for the parameter: the message is not lost, it waits in the queue
    expect(toasts.filter(has_text="correct it")).to_have_count(1)  # once, naming the field
    expect(toasts.filter(has_text="correct it")).to_contain_text("Max new tokens:")
    expect(page.locator("#queue-row")).to_be_visible()
    expect(page.locator("#chatbot .error, #chat-input .error, #params .error")).to_have_count(0)
    page.screenshot(path=str(artifacts / "parameter-error.png"), full_page=True)
    max_new.fill("32")
    max_new.press("Tab")
    box.press("Enter")  # the queued message goes
    expect(page.locator(BOT)).to_have_count(2, timeout=60_000)
    expect(page.locator("#queue-row")).to_be_hidden()
