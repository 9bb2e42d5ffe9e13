"""The Gradio Blocks UI: chat, completion and the model pool, as a thin adapter over the services.

`create_ui(services)` returns the Blocks so tests can drive it. Handlers are async generators
that yield as tokens arrive; when Gradio cancels one (the Stop button, a closed tab) the
generation's handle is cancelled in a `finally`, which frees the model's batch slot.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from llm_pool import Finished, GenerationParams, GenerationRequest, Message, ShoalError, TextDelta
from llm_pool.stream import Failed
from service import Services

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _text_of(content: Any) -> str:
    """Gradio 6 hands message content over as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if isinstance(content, dict):
        return content.get("text", "")
    return ""


def _params(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, stop) -> GenerationParams:
    stops = [s for s in (stop or "").split("|") if s] if isinstance(stop, str) else stop
    return GenerationParams.validated(
        temperature=temperature, top_p=top_p, top_k=int(top_k or 0),
        max_new_tokens=int(max_new_tokens) if max_new_tokens else None,
        repetition_penalty=repetition_penalty,
        seed=int(seed) if seed not in (None, "", -1) and int(seed) >= 0 else None, stop=stops)


def _figures(final: Finished) -> str:
    ttft = f"{final.ttft:.2f} s" if final.ttft is not None else "-"
    return (f"**{final.usage.completion_tokens}** tokens · **{final.tokens_per_second:.1f}** tok/s · "
            f"first token {ttft} · `{final.model}` · {final.reason}")


def _model_table(services: Services) -> str:
    rows = []
    for m in services.pool.models():
        state = m["state"]
        if state == "loading":
            state = f"loading {int(m['progress'] * 100)}% ({html.escape(m['stage'])})"
        if state == "failed":
            state = f"failed: {html.escape(m['error'] or '')}"
        mem = f"{m['resident_bytes'] / 1e9:.2f} GB" if m["resident_bytes"] else "-"
        rows.append(f"<tr><td><b>{html.escape(m['name'])}</b></td><td>{html.escape(m['version'])}</td>"
                    f"<td>{m['kind']}</td><td class='state-{m['state']}'>{state}</td><td>{mem}</td>"
                    f"<td>{'📌' if m['pinned'] else ''}</td><td>{m['requests_served']}</td></tr>")
    budget = services.pool.budget / 1e9
    used = services.pool.resident_bytes() / 1e9
    return ("<table class='shoal-models'><tr><th>model</th><th>version</th><th>kind</th><th>state</th>"
            "<th>memory</th><th>pinned</th><th>served</th></tr>" + "".join(rows) +
            f"</table><p>Memory: {used:.2f} GB of {budget:.2f} GB budget</p>")


def create_ui(services: Services) -> gr.Blocks:
    pool = services.pool
    chat_models = [s.name for s in services.catalog.all() if s.kind == "chat"]
    all_models = services.catalog.names()
    default_chat = pool.default_model if pool.default_model in chat_models else (chat_models or [None])[0]
    completion_models = [s.name for s in services.catalog.all() if s.kind == "completion"] or all_models

    with gr.Blocks(title="Shoal") as demo:
        gr.HTML("<div class='shoal-header'><span class='shoal-logo'>🐟</span> <b>Shoal</b> "
                "<span class='shoal-sub'>a pool of LLMs</span></div>")
        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                chat_model = gr.Dropdown(chat_models, value=default_chat, label="Model",
                                         elem_id="chat-model", scale=3)
            chatbot = gr.Chatbot(elem_id="chatbot", height=480, buttons=["copy"],
                                 placeholder="Ask anything.")
            with gr.Row():
                message = gr.Textbox(placeholder="Message (Enter sends, Shift+Enter for a new line)",
                                     show_label=False, lines=1, max_lines=8, scale=8,
                                     elem_id="chat-input")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            figures = gr.Markdown(elem_id="reply-figures")
            with gr.Accordion("Parameters", open=False):
                system = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt")
                with gr.Row():
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.01, 1, value=1.0, step=0.01, label="Top p")
                    top_k = gr.Number(0, label="Top k (0 = off)", precision=0, minimum=0)
                with gr.Row():
                    max_new = gr.Number(256, label="Max new tokens", precision=0, minimum=1, maximum=32768)
                    repetition = gr.Slider(0.5, 2, value=1.0, step=0.05, label="Repetition penalty")
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                stop_text = gr.Textbox(label="Stop sequences (separate with |)")

        with gr.Tab("Complete", id="complete"):
            comp_model = gr.Dropdown(all_models, value=completion_models[0] if completion_models else None,
                                     label="Model", elem_id="complete-model")
            gr.Markdown("Base models continue text: write the beginning, the model writes the rest.")
            prompt = gr.Textbox(label="Text to continue", lines=6, elem_id="complete-prompt")
            with gr.Row():
                comp_go = gr.Button("Complete", variant="primary", elem_id="complete-go")
                comp_stop = gr.Button("Stop", variant="stop", elem_id="complete-stop")
            completion = gr.Textbox(label="Continuation", lines=8, elem_id="complete-output",
                                    buttons=["copy"])
            comp_figures = gr.Markdown()
            with gr.Row():
                comp_temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                comp_max_new = gr.Number(128, label="Max new tokens", precision=0, minimum=1, maximum=32768)

        with gr.Tab("Models", id="models"):
            table = gr.HTML(lambda: _model_table(services), elem_id="model-table", every=2.0)
            with gr.Row():
                pick = gr.Dropdown(all_models, value=all_models[0] if all_models else None,
                                   label="Model", scale=3)
                load_btn = gr.Button("Load", scale=1)
                unload_btn = gr.Button("Unload", scale=1)
            model_note = gr.Markdown()

        async def respond(history, text, model, system_prompt, *param_values):
            text = (text or "").strip()
            if not text:
                raise gr.Error("Write a message first.")
            try:
                params = _params(*param_values)
            except ShoalError as exc:
                raise gr.Error(exc.message) from None
            messages = [Message("system", system_prompt)] if system_prompt else []
            messages += [Message(m["role"], _text_of(m["content"])) for m in history or []]
            messages.append(Message("user", text))
            history = list(history or []) + [{"role": "user", "content": text},
                                             {"role": "assistant", "content": ""}]
            yield history, "", ""
            async for updated, note in _stream(GenerationRequest(params, messages=messages), model, history):
                yield updated, "", note

        async def _stream(request, model, history):
            try:
                handle = await pool.asubmit(model, request)
            except ShoalError as exc:
                raise gr.Error(exc.message) from None
            try:
                async for event in handle:
                    if isinstance(event, TextDelta):
                        history[-1]["content"] += event.text
                        yield history, ""
                    elif isinstance(event, Finished):
                        yield history, _figures(event)
                    elif isinstance(event, Failed):
                        raise gr.Error(event.error.message)
            finally:
                handle.cancel()

        param_inputs = [temperature, top_p, top_k, max_new, repetition, seed, stop_text]
        chat_inputs = [chatbot, message, chat_model, system, *param_inputs]
        sent = message.submit(respond, chat_inputs, [chatbot, message, figures], api_name="chat")
        clicked = send.click(respond, chat_inputs, [chatbot, message, figures], api_visibility="private")
        stop.click(None, cancels=[sent, clicked])

        async def complete(model, text, temp, max_tokens):
            if not (text or "").strip():
                raise gr.Error("Write some text to continue.")
            try:
                params = GenerationParams.validated(temperature=temp, max_new_tokens=int(max_tokens or 128))
                handle = await pool.asubmit(model, GenerationRequest(params, prompt=text))
            except ShoalError as exc:
                raise gr.Error(exc.message) from None
            out = ""
            try:
                async for event in handle:
                    if isinstance(event, TextDelta):
                        out += event.text
                        yield out, ""
                    elif isinstance(event, Finished):
                        yield out, _figures(event)
                    elif isinstance(event, Failed):
                        raise gr.Error(event.error.message)
            finally:
                handle.cancel()

        comp_event = comp_go.click(complete, [comp_model, prompt, comp_temperature, comp_max_new],
                                   [completion, comp_figures], api_name="complete")
        comp_stop.click(None, cancels=[comp_event])

        def do_load(name):
            try:
                pool.load(name)
                return f"Loaded **{name}**.", _model_table(services)
            except ShoalError as exc:
                raise gr.Error(exc.message) from None

        def do_unload(name):
            try:
                pool.unload(name)
                return f"Unloaded **{name}**.", _model_table(services)
            except ShoalError as exc:
                raise gr.Error(exc.message) from None

        load_btn.click(do_load, [pick], [model_note, table], api_name="load_model")
        unload_btn.click(do_unload, [pick], [model_note, table], api_name="unload_model")
    return demo


def ui_css() -> str:
    path = ASSETS / "shoal.css"
    return path.read_text() if path.exists() else ""
