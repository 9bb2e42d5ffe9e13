"""The Gradio Blocks UI: chat sessions in a sidebar, completion, and the model pool.

`create_ui(services)` returns the Blocks so tests can drive it. The layout lives here; the chat
handlers in `ui_chat.py`, the gradio_client endpoints in `ui_api.py`. Handlers are thin: they
call the services and translate errors into `gr.Error` messages.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from memory.store import MAX_QUERY
from service import Services

from . import ui_api
from .ui_chat import DEFAULTS, ChatHandlers
from .ui_common import model_line, model_table

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def create_ui(services: Services) -> gr.Blocks:
    catalog = services.catalog
    chat_models = [n for n in catalog.names() if catalog.get(n).kind == "chat"]
    all_models = catalog.names()
    default_chat = services.pool.default_model if services.pool.default_model in chat_models \
        else (chat_models[0] if chat_models else None)
    completion_models = [n for n in all_models if catalog.get(n).kind == "completion"] or chat_models
    generating = [n for n in all_models if catalog.get(n).kind in ("chat", "completion")]  # not embedders
    handlers = ChatHandlers(services, default_chat)

    with gr.Blocks(title="Shoal", fill_height=True) as demo:
        # The browser keeps a server-signed id; BrowserState's own secret reaches the browser, so
        # it is a derived value and the signature is what makes the id trustworthy.
        browser_id = gr.BrowserState(None, storage_key="shoal-user", secret=services.browser_state_secret)
        loaded = gr.HTML("", elem_id="ui-loaded", visible="hidden")  # set once this browser's user is known
        session_id = gr.State(None)
        edit_index = gr.State(None)
        with gr.Sidebar(open=True, elem_id="sidebar", width=290):
            gr.HTML("<div class='shoal-header'><span class='shoal-mark'></span><b>Shoal</b></div>")
            new_chat = gr.Button("+ New chat", variant="primary", elem_id="new-chat")
            same_settings = gr.Checkbox(False, label="New chats: same settings as this chat", elem_id="same-settings",
                                        container=False)
            search = gr.Textbox(label="Search chats", placeholder="Search chats", show_label=False,
                                elem_id="chat-search", max_lines=1, max_length=MAX_QUERY, container=False)
            sessions = gr.Radio([], label="Chats", elem_id="session-list", container=False)
            with gr.Accordion("This chat", open=False, elem_id="manage-chat"):
                title = gr.Textbox(label="Title", elem_id="rename-box", max_lines=1)
                rename = gr.Button("Rename", size="sm", elem_id="rename")
                delete = gr.Button("Delete chat", size="sm", variant="stop", elem_id="delete-chat")
                with gr.Row(visible=False) as confirm_row:
                    confirm = gr.Button("Yes, delete it", size="sm", variant="stop", elem_id="confirm-delete")
                    cancel = gr.Button("Keep it", size="sm", elem_id="cancel-delete")
                export = gr.Button("Export (Markdown + JSON)", size="sm", elem_id="export")
                exported = gr.File(label="Export", file_count="multiple", visible=False, elem_id="exported")
                importer = gr.UploadButton("Import a JSON export", file_types=[".json"], size="sm",
                                           elem_id="import")
            with gr.Accordion("All chats", open=False):
                days = gr.Number(30, label="Delete chats unused for this many days", precision=0, minimum=0)
                purge = gr.Button("Delete old chats", size="sm", variant="stop", elem_id="purge")
            gr.HTML("<div class='shoal-api'>API on this address: OpenAI (<code>/v1/chat/completions</code>, "
                    "<code>/v1/responses</code>), Anthropic (<code>/v1/messages</code>), TGI and sessions. "
                    "<a href='/docs' target='_blank'>Every route: /docs</a><br>OpenAI SDKs: <code>base_url=</code>"
                    "<code id='shoal-base-url'>/v1</code> <a href='#' class='shoal-copy-base' "
                    "title='Copy the base_url'>copy</a></div>", elem_id="api-note")

        with gr.Tab("Chat", id="chat"):
            with gr.Row(equal_height=True):
                model = gr.Dropdown(chat_models, value=default_chat, label="Model", elem_id="chat-model",
                                    scale=2, min_width=200)
                status = gr.Markdown(model_line(services, default_chat), elem_id="model-status")
            if completion_models and set(completion_models) - set(chat_models):
                gr.Markdown("Base models without a chat template (" + ", ".join(
                    f"`{n}`" for n in completion_models if n not in chat_models) +
                    ") are in the **Complete** tab.", elem_classes=["shoal-note"])
            chatbot = gr.Chatbot(elem_id="chatbot", buttons=["copy"], scale=1, min_height=320,
                                 placeholder="Start a conversation. Your chats are kept on this server.",
                                 feedback_options=None)
            editing = gr.Markdown("", elem_id="editing-note")
            # messages sent while a reply streams wait here, in order (ui_queue)
            with gr.Row(visible=False, elem_id="queue-row") as queue_row:
                queue_pick = gr.Dropdown([], label="Queued: sent when the reply ends", elem_id="queue-pick",
                                         scale=6)
                queue_edit = gr.Button("Edit", size="sm", elem_id="queue-edit", scale=1, min_width=70)
                queue_remove = gr.Button("Remove", size="sm", elem_id="queue-remove", scale=1, min_width=70)
            with gr.Row(equal_height=True):
                message = gr.Textbox(placeholder="Message (Enter sends, Shift+Enter for a new line)",
                                     show_label=False, lines=1, max_lines=8, scale=8, elem_id="chat-input",
                                     autofocus=True)
                send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
            with gr.Row():
                regenerate = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                go_on = gr.Button("Continue", size="sm", elem_id="continue")
                edit_last = gr.Button("Edit last message", size="sm", elem_id="edit-last")
                undo = gr.Button("Undo delete", size="sm", visible=False, elem_id="undo-delete")
                # shown while a message waits for a file of the chat still being read (the tick)
                ask_now = gr.Button("Ask now, without the file still being read", size="sm", visible=False,
                                    variant="primary", elem_id="ask-now")
            # the links under each message (Edit, Regenerate, Delete, ‹ 2/3 ›) send their action here (ui_js)
            message_action = gr.Textbox(visible="hidden", elem_id="msg-action")
            message_go = gr.Button(visible="hidden", elem_id="msg-action-go")
            reply_figures = gr.Markdown(elem_id="reply-figures")
            with gr.Accordion("Files in this chat", open=False, elem_id="files-panel"):
                gr.Markdown("Answers use these files and cite them. pdf, docx, text, Markdown and code "
                            f"files up to {services.settings.max_upload_mb:g} MB.", elem_classes=["shoal-note"])
                uploads = gr.File(label="Add files", file_count="multiple", elem_id="file-upload",
                                  file_types=[".pdf", ".docx", ".txt", ".md", ".py", ".js", ".ts", ".rs", ".go",
                                              ".java", ".c", ".h", ".cpp", ".hpp", ".rb", ".php", ".cs", ".kt",
                                              ".swift", ".sh", ".sql", ".html", ".css", ".json", ".yaml",
                                              ".yml", ".toml", ".csv", ".log", ".rst"])
                files_table = gr.HTML("", elem_id="files-table")
                with gr.Row():
                    file_pick = gr.Dropdown([], label="File", scale=3, elem_id="file-pick")
                    remove_file = gr.Button("Remove file", scale=1, variant="stop", elem_id="remove-file")
            with gr.Accordion("Parameters and system prompt", open=False, elem_id="params"):
                system = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt")
                with gr.Row():
                    temperature = Slider(0, 2, value=DEFAULTS["temperature"], step=0.05, label="Temperature",
                                         elem_id="temperature")
                    top_p = Slider(0.01, 1, value=DEFAULTS["top_p"], step=0.01, label="Top p", elem_id="top-p")
                    top_k = gr.Number(0, label="Top k (0 = off)", precision=0)
                with gr.Row():
                    max_new = gr.Number(256, label="Max new tokens", precision=0, elem_id="max-new-tokens")
                    repetition = Slider(0.5, 2, value=DEFAULTS["repetition_penalty"], step=0.05,
                                        label="Repetition penalty")
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                with gr.Row():
                    stop_text = gr.Textbox(label="Stop sequences (separate with |)")
                    history_limit = gr.Number(0, label="History to keep (messages, 0 = all that fit)",
                                              precision=0)
                with gr.Row():
                    json_mode = gr.Checkbox(False, label="JSON output (the reply is valid JSON)",
                                            elem_id="json-output")
                    json_schema = gr.Textbox(label="JSON schema (optional)", lines=2, elem_id="json-schema",
                                             placeholder='{"type": "object", "properties": {...}}')
                with gr.Row():
                    tools_text = gr.Textbox(label="Tools the model may call (a JSON list of OpenAI function tools)",
                                            lines=2, elem_id="tools", scale=3,
                                            placeholder='[{"type": "function", "function": {"name": "get_weather", '
                                                        '"parameters": {"type": "object", ...}}}]')
                    tool_choice = gr.Radio(["auto", "required"], value="auto", label="Tool use", elem_id="tool-choice",
                                           info="required: each message you write is answered with a call")
                mcp_servers = gr.CheckboxGroup(services.mcp.names, value=[], label="MCP tools this chat may call",
                                               info="Shoal runs each call and the model answers from its result",
                                               elem_id="mcp-servers", visible=bool(services.mcp.names))

        with gr.Tab("Complete", id="complete"):
            with gr.Row(equal_height=True):
                comp_model = gr.Dropdown(generating, value=completion_models[0] if completion_models else None,
                                         label="Model", elem_id="complete-model", scale=2, min_width=200)
                comp_status = gr.Markdown(model_line(services, completion_models[0] if completion_models else None),
                                          elem_id="complete-model-status")
            gr.Markdown("Base models continue text: write the beginning, the model writes the rest.")
            prompt = gr.Textbox(label="Text to continue", lines=6, elem_id="complete-prompt")
            with gr.Row():
                comp_go = gr.Button("Complete", variant="primary", elem_id="complete-go")
                comp_stop = gr.Button("Stop", variant="stop", elem_id="complete-stop")
            completion = gr.Textbox(label="Continuation", lines=8, elem_id="complete-output", buttons=["copy"])
            comp_figures = gr.Markdown()
            with gr.Row():
                comp_temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                comp_max_new = gr.Number(128, label="Max new tokens", precision=0, minimum=1, maximum=32768)

        with gr.Tab("Models", id="models"):
            table = gr.HTML(model_table(services), elem_id="model-table")
            with gr.Row(visible=False, elem_id="model-controls") as model_controls:  # admins only
                pick = gr.Dropdown(all_models, value=all_models[0] if all_models else None, label="Model", scale=3)
                load_btn = gr.Button("Load", scale=1, elem_id="load-model")
                unload_btn = gr.Button("Unload", scale=1, elem_id="unload-model")
                pin_btn = gr.Button("Pin", scale=1)
                unpin_btn = gr.Button("Unpin", scale=1)
            model_note = gr.Markdown()

        timer = gr.Timer(2.0)
        timer.tick(handlers.tick, [browser_id, session_id, model, search, comp_model],
                   [status, table, files_table, file_pick, chatbot, sessions, ask_now, comp_status],
                   api_visibility="private", queue=False, show_progress="hidden")

        params = [temperature, top_p, top_k, max_new, repetition, seed, stop_text]
        settings = [model, system, *params, history_limit]
        # saved on their own: a half-typed JSON list is not saved
        tool_settings = [tools_text, tool_choice, mcp_servers]
        view = [session_id, sessions, chatbot, title, reply_figures, *settings, *tool_settings]

        shown = handlers.watching  # handlers that change the chat shown: the page's chat is recorded
        demo.load(shown(handlers.start, at=1), [browser_id], [browser_id, *view, model_controls, status, table],
                  api_visibility="private").then(
            lambda: "loaded", None, [loaded], api_visibility="private", queue=False)
        sessions.input(shown(handlers.open), [browser_id, sessions], view, api_visibility="private")
        new_chat.click(shown(handlers.new), [browser_id, same_settings, *settings], view, api_visibility="private")
        gr.on([w.input for w in settings], handlers.save_settings, [browser_id, session_id, *settings],
              [status], api_visibility="private", show_progress="hidden")
        rename.click(handlers.rename, [browser_id, session_id, title], [sessions], api_visibility="private")
        delete.click(lambda: gr.Row(visible=True), None, [confirm_row], api_visibility="private")
        cancel.click(lambda: gr.Row(visible=False), None, [confirm_row], api_visibility="private")
        confirm.click(shown(handlers.delete), [browser_id, session_id], view, api_visibility="private").then(
            lambda: gr.Row(visible=False), None, [confirm_row], api_visibility="private")
        export.click(handlers.export, [browser_id, session_id], [exported], api_visibility="private")
        importer.upload(shown(handlers.import_file), [browser_id, importer], view, api_visibility="private")
        purge.click(shown(handlers.purge), [browser_id, session_id, days], view, api_visibility="private")

        uploads.upload(handlers.upload, [browser_id, session_id, uploads, *settings],
                       [session_id, sessions, files_table, file_pick, uploads], api_visibility="private")
        remove_file.click(handlers.remove_file, [browser_id, session_id, file_pick], [files_table, file_pick],
                          api_visibility="private")
        # the address bar names the open chat (?chat=<id>): a reload or a second tab opens it again
        gr.on([sessions.change, loaded.change], None, [sessions], None, js=CHAT_URL_JS)
        # (change, not input: Gradio's textbox sends no input event for Backspace, Delete or a cut)
        search.change(handlers.search, [browser_id, search], [sessions], api_visibility="private",
                      trigger_mode="always_last", show_progress="hidden", js=SEARCH_JS)
        # what lists every chat again (opening one, a new one, a turn...) ends the search
        gr.on([sessions.input, new_chat.click, rename.click, confirm.click, importer.upload, purge.click,
               uploads.upload, message.submit, send.click, regenerate.click], None, [search], [search],
              js=END_SEARCH_JS)
        sessions.change(handlers.files_view, [browser_id, session_id], [files_table, file_pick],
                        api_visibility="private", show_progress="hidden")

        gr.on([tools_text.blur, tool_choice.input, mcp_servers.input], handlers.save_tools,
              [browser_id, session_id, *tool_settings], [status], api_visibility="private", show_progress="hidden")

        turn_out = [chatbot, message, reply_figures, sessions, session_id, edit_index, editing]
        turn_in = [browser_id, session_id, message, edit_index, *settings, json_mode, json_schema, *tool_settings]
        queue_view = [queue_row, queue_pick]
        # Enter or Send queues the message (at once, the box emptied); the chained event sends the
        # queue, streaming, unless a reply streams in this chat already: that one sends it next
        accepted = [message, edit_index, editing, *queue_view]
        message.submit(handlers.accept, [browser_id, session_id, message, edit_index], accepted, queue=False,
                              trigger_mode="multiple", api_visibility="private").then(
            handlers.drain, turn_in, turn_out + queue_view, api_visibility="private")
        send.click(handlers.accept, [browser_id, session_id, message, edit_index], accepted, queue=False,
                             trigger_mode="multiple", api_visibility="private").then(
            handlers.drain, turn_in, turn_out + queue_view, api_visibility="private")
        queue_remove.click(handlers.queue_remove, [browser_id, session_id, queue_pick], queue_view, queue=False,
                           api_visibility="private")
        queue_edit.click(handlers.queue_edit, [browser_id, session_id, queue_pick, message], [message, *queue_view],
                         queue=False, api_visibility="private")
        sessions.change(handlers.queue_shown, [browser_id, session_id], queue_view, api_visibility="private",
                        queue=False, show_progress="hidden")
        regenerate.click(handlers.regenerate, [browser_id, session_id], turn_out, api_visibility="private")
        go_on.click(handlers.continue_, [browser_id, session_id], turn_out, api_visibility="private")
        chatbot.clear(handlers.clear, [browser_id, session_id], [chatbot, reply_figures, undo],
                      api_visibility="private")
        message_go.click(handlers.message_action, [browser_id, session_id, message_action],
                         [*turn_out, undo], api_visibility="private", js=ACTION_JS)
        undo.click(handlers.undo_delete, [browser_id, session_id], [chatbot, undo], api_visibility="private")
        ask_now.click(handlers.ask_now, [browser_id, session_id], [ask_now], api_visibility="private", queue=False)
        # a turn, a new chat or another chat opened: the delete is final (the Undo button goes)
        gr.on([sessions.input, new_chat.click, message.submit, send.click, regenerate.click], lambda: gr.Button(
            visible=False), None, [undo], api_visibility="private", queue=False, show_progress="hidden")
        # Stop cancels the reply on the server; its event ends as any reply does (Gradio's `cancels`
        # sometimes marked the chat, the box and the figures "Error")
        stop.click(handlers.stop, [browser_id, session_id], None, queue=False, api_visibility="private")
        edit_last.click(handlers.edit_last, [browser_id, session_id], [message, edit_index, editing],
                        api_visibility="private")

        comp_event = comp_go.click(handlers.complete, [comp_model, prompt, comp_temperature, comp_max_new],
                                   [completion, comp_figures], api_name="complete")
        comp_stop.click(None, cancels=[comp_event])
        comp_model.change(lambda name: model_line(services, name), [comp_model], [comp_status], queue=False,
                          api_visibility="private", show_progress="hidden")

        for button, action in ((load_btn, "load"), (unload_btn, "unload"), (pin_btn, "pin"), (unpin_btn, "unpin")):
            button.click(handlers.model_action(action), [pick], [model_note, table], api_visibility="private")
        ui_api.register(services)
    return demo


# The search box emptied by another event leaves the list as that event drew it (else the search's
# own list, read a moment earlier, could land after it and lack a chat just made or keep one deleted).
END_SEARCH_JS = "(q) => { if (q) window.shoalSearchEnded = true; return ''; }"
SEARCH_JS = """(browser, q) => {
    if (!window.shoalSearchEnded) return [browser, q];
    window.shoalSearchEnded = false;
    return [browser, null];
}"""
# the message action a link under a message chose (ui_js keeps it in window.shoalAction)
ACTION_JS = "(browser, chat, action) => [browser, chat, window.shoalAction || '']"
CHAT_URL_JS = """(id) => {
    const url = new URL(window.location.href);
    if (id) url.searchParams.set("chat", id); else url.searchParams.delete("chat");
    if (url.href !== window.location.href) history.replaceState(history.state, "", url);
}"""


def Slider(*args, **kwargs) -> gr.Slider:  # noqa: N802 (a gr.Slider, built as one)
    """A Gradio slider whose typed-in value outside its range reaches the handler, which names the
    field once ("Top p: must be ..."), instead of Gradio's own error ("Value 600 is greater than
    maximum value 1.", naming nothing, raised by every event that reads it and marked over its
    outputs). (Not a subclass: Gradio writes a .pyi stub beside a module that subclasses one.)"""
    slider = gr.Slider(*args, **kwargs)
    slider.preprocess = lambda payload: gr.Number.round_to_precision(payload, slider.precision)
    return slider


def ui_css() -> str:
    path = ASSETS / "shoal.css"
    return path.read_text() if path.exists() else ""


def ui_js() -> str:
    """On a phone-sized screen, start with the chat in view and the sidebar folded away. An answer's
    inline citation ([n], a.shoal-cite) opens its passage under the answer and scrolls to it. The
    links under a message (a.shoal-act) send their action to the hidden message-action event; a
    message's Copy copies its text without the HTML Shoal added around it."""
    return """() => {
    if (navigator.clipboard && navigator.clipboard.writeText) {
        // a message's Copy button copies its text: without the actions line, the links of its
        // citations or the folded sources (HTML Shoal added to show them)
        const write = navigator.clipboard.writeText.bind(navigator.clipboard);
        const plain = (text) => String(text)
            .replace(/\\s*<div class="shoal-actions">[\\s\\S]*?<\\/div>\\s*$/, '')
            .replace(/<details class='shoal-sources'><summary>([\\s\\S]*?)<\\/summary>[\\s\\S]*?<\\/details>/g, '$1')
            .replace(/<a class="shoal-cite"[^>]*>([\\s\\S]*?)<\\/a>/g, '$1')
            .replace(/&#91;/g, '[').replace(/&#93;/g, ']').replace(/&lt;/g, '<').replace(/&gt;/g, '>')
            .replace(/&quot;/g, '"').replace(/&#x27;/g, "'").replace(/&amp;/g, '&');
        navigator.clipboard.writeText = (text) => write(plain(text));
    }
    document.addEventListener('click', (event) => {
        const act = event.target.closest && event.target.closest('a.shoal-act');
        if (act) {  // a message's Edit / Regenerate / Delete / ‹ › : the hidden message-action event
            event.preventDefault();
            event.stopPropagation();
            window.shoalAction = (act.getAttribute('href') || '').replace('#shoal-act-', '');
            const go = document.querySelector('#msg-action-go');
            if (go) go.click();
            return;
        }
        const copy = event.target.closest && event.target.closest('a.shoal-copy-base');
        if (copy) {  // the OpenAI base_url of this address, copied
            event.preventDefault();
            navigator.clipboard.writeText(shoalBaseUrl()).then(() => { copy.textContent = 'copied'; });
            return;
        }
        const cite = event.target.closest && event.target.closest('a.shoal-cite');
        const target = cite && document.getElementById((cite.getAttribute('href') || '').slice(1));
        if (!target) return;
        event.preventDefault();
        for (let d = target.closest('details'); d; d = d.parentElement && d.parentElement.closest('details')) {
            d.open = true;
        }
        target.scrollIntoView({block: 'nearest', behavior: 'smooth'});
        target.classList.remove('shoal-cited');
        void target.offsetWidth;
        target.classList.add('shoal-cited');
    }, true);
    // the API's base_url as this page reaches it (behind a proxy too: the page's own address)
    const shoalBaseUrl = () => window.location.origin + window.location.pathname.replace(/\\/+$/, '') + '/v1';
    window.shoalBaseUrl = shoalBaseUrl;
    const showBase = () => {
        const code = document.querySelector('#shoal-base-url');
        if (code) code.textContent = shoalBaseUrl(); else setTimeout(showBase, 200);
    };
    showBase();
    setTimeout(() => {
        if (window.innerWidth < 700) {
            const toggle = document.querySelector('button[aria-label="Toggle Sidebar"]');
            const sidebar = document.querySelector('.sidebar');
            if (toggle && sidebar && sidebar.classList.contains('open')) toggle.click();
        }
    }, 200); }"""
