"""Small helpers the UI modules share: who the user is, and how things are shown."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import gradio as gr

from llm_pool import Finished, GenerationParams
from llm_pool.errors import InvalidParamsError
from llm_pool.reasoning import ThoughtMarks, ThoughtSplitter
from memory.store import StoredMessage
from service import Services
from service.identity import Caller

from .auth import COOKIE, key_from


def request_caller(services: Services, request: gr.Request | None) -> Caller:
    """The caller of a Gradio event, decided as for every HTTP request: a valid key (header or
    signed cookie), else the trusted local owner, else anonymous."""
    if request is None or not request.headers:
        return services.identity.caller(key=None, cookie=None, host=None)
    host = request.client.host if request.client else None
    return services.identity.caller(key=key_from(request.headers), cookie=(request.cookies or {}).get(COOKIE),
                                    host=host)


def ui_caller(services: Services, browser_token: str | None, request: gr.Request | None) -> Caller:
    """The web UI's user: the key's owner when signed in with a key, else this browser's
    server-signed id. A forged or altered id is refused (the page then gets a new one)."""
    base = request_caller(services, request)
    if services.identity.keys_required and base.how != "key":
        raise gr.Error("Sign in with an API key first.")
    caller = services.identity.browser_caller(base, browser_token)
    if caller is None:
        raise gr.Error("This browser has no valid user id; reload the page.")
    return caller


def ui_user(services: Services, browser_token: str | None, request: gr.Request | None) -> str:
    return ui_caller(services, browser_token, request).user


def api_caller(services: Services, request: gr.Request | None) -> Caller:
    """For gradio_client calls about stored sessions: a user, as for the REST session routes."""
    caller = request_caller(services, request)
    if caller.user is None:
        raise gr.Error(services.identity.user_refusal())
    return caller


def admin_check(services: Services, request: gr.Request | None) -> Caller:
    caller = request_caller(services, request)
    if not caller.admin:
        raise gr.Error(services.identity.admin_refusal())
    return caller


def text_of(content: Any) -> str:
    """Gradio 6 hands message content over as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if isinstance(content, dict):
        return content.get("text", "")
    return ""


# the parameter widgets' labels: an error names the field as the page shows it
PARAM_LABELS = {"temperature": "Temperature", "top_p": "Top p", "top_k": "Top k", "max_new_tokens": "Max new tokens",
                "repetition_penalty": "Repetition penalty", "seed": "Seed", "stop": "Stop sequences",
                "max_history_messages": "History to keep"}


def params_from(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, stop) -> dict:
    """The parameter widgets' values as a validated dict; InvalidParamsError naming the field by its
    label ("Top p: must be ...")."""
    stops = [s for s in (stop or "").split("|") if s]
    values = {"temperature": temperature, "top_p": top_p, "top_k": top_k if top_k is not None else 0,
              "max_new_tokens": max_new_tokens if max_new_tokens not in (None, "") else None,
              "repetition_penalty": repetition_penalty,
              "seed": seed if isinstance(seed, (int, float)) and seed >= 0 else None, "stop": stops}
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return {k: v for k, v in GenerationParams.validated(**values).to_dict().items() if k in values}
    except InvalidParamsError as exc:
        raise named(exc) from None


def named(exc: InvalidParamsError) -> InvalidParamsError:
    """The error with its field named by the label the page shows ("Top p: must be between ...")."""
    label = PARAM_LABELS.get(exc.param or "")
    if label is None:
        return exc
    text = exc.message[len(exc.param):].lstrip() if exc.message.startswith(exc.param) else exc.message
    return InvalidParamsError(f"{label}: {text}", param=exc.param)


def figures(final: Finished) -> str:
    ttft = f"{final.ttft:.2f} s" if final.ttft is not None else "-"
    return (f"**{final.usage.completion_tokens}** tokens · **{final.tokens_per_second:.1f}** tok/s · "
            f"first token {ttft} · `{final.model}` · {final.reason}"
            f"{_cached(final.usage.cached_tokens, final.usage.disk_tokens)}")


def _cached(cached: int, disk: int) -> str:
    if not cached:
        return ""
    return f" · {cached} prompt tokens cached" + (f" ({disk} read from disk)" if disk else "")


def stored_figures(message: StoredMessage) -> str:
    meta = message.meta
    usage, timings = meta.get("usage") or {}, meta.get("timings") or {}
    if not usage:
        return ""
    ttft = timings.get("ttft_s")
    return (f"**{usage.get('completion_tokens', 0)}** tokens · **{timings.get('tokens_per_second', 0):.1f}** "
            f"tok/s · first token {f'{ttft:.2f} s' if ttft is not None else '-'} · `{meta.get('model')}` · "
            f"{meta.get('finish_reason')}{_cached(usage.get('cached_tokens', 0), usage.get('disk_tokens', 0))}")


def _pretty(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except ValueError:
        return arguments


THOUGHT = "Thought"


def thought_message(text: str, done: bool = True) -> dict:
    """A model's thoughts as a Chatbot message that Gradio shows folded (open, with a spinner,
    while the model still thinks)."""
    return {"role": "assistant", "content": text,
            "metadata": {"title": THOUGHT, "status": "done" if done else "pending"}}


class StreamedReply:
    """A reply as it streams into the Chatbot's last message; a model's thoughts (reasoning.py) go
    to a Thought message before it."""

    def __init__(self, view: list[dict], marks: ThoughtMarks | None):
        self.view = view
        self.splitter = ThoughtSplitter(marks) if marks else None
        self.thought: dict | None = None

    def add(self, text: str) -> None:
        if self.splitter is None:
            self.view[-1]["content"] += text
        else:
            self._show(*self.splitter.feed(text))

    def end(self) -> None:
        if self.splitter is not None:
            self._show(*self.splitter.flush())
        if self.thought is not None:
            self.thought["metadata"]["status"] = "done"

    def _show(self, thought: str, said: str) -> None:
        if thought and self.thought is None:
            self.thought = thought_message("", done=False)
            self.view.insert(len(self.view) - 1, self.thought)
        if thought:
            self.thought["content"] += thought
        self.view[-1]["content"] += said
        if self.thought is not None and not self.splitter.thinking:
            self.thought["metadata"]["status"] = "done"


def chat_view(messages: list[StoredMessage], forks: dict[int, tuple[int, int]] | None = None) -> list[dict]:
    """Stored messages as Chatbot messages, with the sources an answer used and, folded, the
    thoughts of a model that thinks. With `forks` (the store's `thread`), each message ends with
    its actions (edit, regenerate, delete) and, where an edit or a regenerate made versions, the
    `‹ 2/3 ›` that switches between them (links that ui.ui_js turns into the message-action event)."""
    view = []
    navs = {at: (at, selected, count) for at, (selected, count) in (forks or {}).items()}
    ran = {m.meta["tool_call_id"]: m.meta for m in messages if m.role == "user" and m.meta.get("mcp_server")}
    for index, message in enumerate(messages):
        if message.role == "system":
            continue
        if message.role == "assistant" and message.meta.get("reasoning"):
            view.append(thought_message(message.meta["reasoning"]))
        calls = message.meta.get("tool_calls") if message.role == "assistant" else None
        if calls:  # shown as calls, not as the JSON the model wrote
            for call in calls:
                mcp = ran.get(call["id"])
                title = (f"🔧 Called {mcp['mcp_tool']} on MCP server {mcp['mcp_server']}" if mcp
                         else f"🔧 Called {call['function']['name']}: reply with its result")
                view.append({"role": "assistant", "content": f"```json\n{_pretty(call['function']['arguments'])}\n```",
                             "metadata": {"title": title}})
            continue
        if message.role == "user" and message.meta.get("mcp_server"):  # Shoal ran the call: its result
            failed = " (failed)" if message.meta.get("mcp_error") else ""
            view.append({"role": "assistant", "content": message.content,
                         "metadata": {"title": f"↩ Result of {message.meta.get('mcp_tool')}{failed}"}})
            continue
        if message.role == "user" and message.meta.get("tool_call_id"):
            view.append({"role": "user", "content": f"↩ Result of {message.meta.get('tool')}:\n\n{message.content}"})
            continue
        content = message.content
        sources = message.meta.get("sources") or []
        if sources:
            anchor = f"shoal-m{index}"  # the message's place in the chat: ids unique on the page
            content = cite_links(content, sources, anchor) + "\n\n" + sources_html(sources, anchor)
        if forks is not None:
            content += "\n\n" + message_actions(index, message.role, navs.get(index))
        view.append({"role": message.role, "content": content})
    return view


def message_actions(index: int, role: str, nav: tuple[int, int, int] | None) -> str:
    """The line under a message: ‹ 2/3 › where it has versions, Edit (the user's messages) or
    Regenerate (replies), and Delete (its turn). Each is a link "#shoal-act-<what>-<index>[-<n>]"."""
    def act(what: str, label: str, title: str) -> str:
        return f'<a class="shoal-act" href="#shoal-act-{what}" title="{title}">{label}</a>'

    parts = []
    if nav is not None:
        at, selected, count = nav
        before = act(f"ver-{at}-{selected - 1}", "‹", "Previous version") if selected > 0 else "<span>‹</span>"
        after = (act(f"ver-{at}-{selected + 1}", "›", "Next version") if selected + 1 < count
                 else "<span>›</span>")
        parts.append(f'<span class="shoal-versions">{before} {selected + 1}/{count} {after}</span>')
    if role == "user":
        parts.append(act(f"edit-{index}", "Edit", "Edit this message: the chat goes on from it as a new version"))
    else:
        parts.append(act(f"regen-{index}", "Regenerate", "Write this reply again: a new version"))
    parts.append(act(f"del-{index}", "Delete", "Delete this message and its reply (can be undone)"))
    return f'<div class="shoal-actions">{" · ".join(parts)}</div>'


def _passages(sources: list[dict]) -> dict[tuple[str, str], list[int]]:
    """The passages an answer was given, each once (its source and excerpt), with the numbers it
    was given under: the same passage given twice has two numbers."""
    groups: dict[tuple[str, str], list[int]] = {}
    for number, source in enumerate(sources, 1):
        groups.setdefault((str(source.get("source", "")), str(source.get("excerpt", ""))), []).append(number)
    return groups


def sources_html(sources: list[dict], anchor: str = "") -> str:
    """The passages an answer was given, folded under one "Sources" line: each opens to where it is
    (file, page or lines, section), its relevance and the passage itself. The same passage given
    twice is listed once, with both numbers the answer may cite. With `anchor` (unique on the page)
    each passage has the id "{anchor}-{its first number}" that the answer's [n] link to (cite_links):
    a click unfolds the list and scrolls to that passage (ui.ui_js; without the script, Chromium's
    own fragment navigation unfolds it)."""
    groups = _passages(sources)
    listed = "; ".join(f"[{', '.join(map(str, n))}] {html.escape(key[0])}" for key, n in groups.items())
    details = []
    for (where, excerpt), numbers in groups.items():
        source = sources[numbers[0] - 1]
        about = [html.escape(str(source["section"]))] if source.get("section") else []
        if source.get("score") is not None:
            about.append(f"relevance {float(source['score']):.2f}")
        target = f" class='shoal-source' id='{html.escape(anchor)}-{numbers[0]}'" if anchor else ""
        details.append(f"<p{target}><b>[{', '.join(map(str, numbers))}] {html.escape(where)}</b>"
                       f"{' · ' + ' · '.join(about) if about else ''}<br>{html.escape(excerpt)}</p>")
    return (f"<details class='shoal-sources'><summary>Sources: {listed}</summary>"
            f"{''.join(details)}</details>")


# What in an answer's Markdown is left as written: code (fenced blocks, `spans`), HTML tags and
# autolinks, the text of its own HTML links, and link reference definitions ("[1]: https://...").
_FENCE = re.compile(r"^[ \t]*(`{3,}(?=[^`]*$)|~{3,})")  # also indented (in a list item)
_KEPT = re.compile(r"(`+)(?:(?!\n[ \t]*\n)[\s\S])*?(?<!`)\1(?!`)|<[aA]\b[^<>]*>[\s\S]*?</[aA]\s*>"
                   r"|<[A-Za-z/!][^<>]*>")
_DEFINITION = re.compile(r"^ {0,3}\[[^\]\n]+\]:[ \t]*\S+(?:[ \t]+(?:\"[^\"\n]*\"|'[^'\n]*'|\([^)\n]*\)))?[ \t]*$")
# [1], [1, 2], [1;2]: not \[1] (escaped), ![1] (an image) or [1](url) (a link)
_CITE = re.compile(r"(?<![\\!])\[([1-9][0-9]{0,3}(?:[ \t]*[,;][ \t]*[1-9][0-9]{0,3})*)\](?!\()")


def cite_links(text: str, sources: list[dict], anchor: str) -> str:
    """An answer's Markdown with each citation of one of its sources ("[1]", "[1, 2]", "[1][2]")
    made a link to that passage in sources_html(sources, anchor) (a passage given twice: both
    numbers link to its one entry). Only the numbers are replaced, with HTML built here; numbers
    that are not sources, code and everything else stay exactly as written."""
    targets = {}
    for (where, _), numbers in _passages(sources).items():
        for number in numbers:
            targets[number] = (f"{anchor}-{numbers[0]}", where)

    def link(number: int, label: str) -> str:
        target, where = targets[number]
        return (f'<a class="shoal-cite" href="#{html.escape(target)}" title="{html.escape(where)}">'
                f"{label}</a>")

    def cite(found: re.Match) -> str:
        inner = found.group(1)
        numbers = [int(n) for n in re.findall(r"[0-9]+", inner)]
        if not any(n in targets for n in numbers):
            return found.group(0)
        if len(numbers) == 1:  # the brackets too: the bigger target to click
            return link(numbers[0], f"&#91;{numbers[0]}&#93;")
        return "[" + re.sub(r"[0-9]+", lambda n: link(int(n.group()), n.group()) if int(n.group()) in targets
                            else n.group(), inner) + "]"

    def prose(part: str) -> str:
        kept, last = [], 0
        for found in _KEPT.finditer(part):
            kept += [_CITE.sub(cite, part[last:found.start()]), found.group()]
            last = found.end()
        return "".join(kept) + _CITE.sub(cite, part[last:])

    out, plain, fence = [], [], None
    for line in text.splitlines(keepends=True):
        opened = _FENCE.match(line)
        if fence is None and opened:
            out.append(prose("".join(plain)))
            plain, fence = [], opened.group(1)
            out.append(line)
        elif fence is not None:
            out.append(line)
            closing = _FENCE.match(line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence) \
                    and not line.strip().strip(fence[0]):
                fence = None
        elif _DEFINITION.match(line):
            out += [prose("".join(plain)), line]
            plain = []
        else:
            plain.append(line)
    out.append(prose("".join(plain)))
    return "".join(out)


def model_table(services: Services) -> str:
    """One row per version: its engine and its live state; the active version of each name first."""
    rows = []
    for model in services.pool.models():
        versions = sorted(model["versions"], key=lambda v: not v["active"])
        for m in versions:
            state = m["state"]
            if state == "loading":
                state = f"loading {int(m['progress'] * 100)}% ({html.escape(m['stage'])})"
            if state == "failed":
                state = f"failed: {html.escape(m['error'] or '')}"
            memory = f"{m['resident_bytes'] / 1e9:.2f} GB" if m["resident_bytes"] else "-"
            if m.get("remote"):
                healthy = sum(1 for r in m.get("replicas") or [] if r["healthy"])
                latency = f", {m['latency_ms']:.0f} ms" if m.get("latency_ms") is not None else ""
                memory = f"remote: {healthy}/{len(m.get('replicas') or [])} replicas up{latency}"
            name = f"<b>{html.escape(m['name'])}</b>" if m["active"] else ""
            version = html.escape(m["version"]) + (" (active)" if m["active"] else "")
            rows.append(f"<tr><td>{name}</td><td>{version}</td><td>{html.escape(m.get('engine') or '')}</td>"
                        f"<td>{m['kind']}</td><td class='state-{m['state']}'>{state}</td><td>{memory}</td>"
                        f"<td>{'pinned' if m['pinned'] else ''}</td><td>{m['in_flight']}</td>"
                        f"<td>{m['requests_served']}</td></tr>")
    budget = services.pool.budget / 1e9
    used = services.pool.resident_bytes() / 1e9
    building = getattr(services.llama_build, "state", None)
    note = ""
    if building and building()["status"] == "building":
        b = building()
        note = (f"<p class='shoal-build'>Building llama.cpp for this CPU: {int(b['progress'] * 100)}% "
                f"({html.escape(b['stage'])}); models run on transformers until it is done.</p>")
    return ("<table class='shoal-models'><tr><th>model</th><th>version</th><th>engine</th><th>kind</th>"
            "<th>state</th><th>memory</th><th></th><th>busy</th><th>served</th></tr>" + "".join(rows) +
            f"</table><p class='shoal-budget'>Memory: {used:.2f} GB of a {budget:.2f} GB budget</p>" + note)


def model_line(services: Services, name: str | None) -> str:
    if not name:
        return ""
    try:
        m = services.pool.status(name)
    except Exception:
        return f"`{html.escape(name)}` is not in the catalog"
    state = m["state"]
    engine = f" · {m['engine']}" if m.get("engine") and not m.get("remote") else ""
    if state == "loading":
        return f"{_dot(state)} `{m['id']}`{engine} loading {int(m['progress'] * 100)}% ({m['stage']})"
    if state == "ready" and m.get("remote"):
        latency = f" · {m['latency_ms']:.0f} ms to first token" if m.get("latency_ms") is not None else ""
        return f"{_dot(state)} `{m['id']}` ready · {m['device']}{latency}"
    if state == "ready":
        return f"{_dot(state)} `{m['id']}` ready{engine} · {m['resident_bytes'] / 1e9:.2f} GB · {m['device']}"
    if state == "failed":
        return f"{_dot(state)} `{m['id']}` failed to load: {html.escape(m['error'] or '')}"
    return f"{_dot(state)} `{m['id']}`{engine} {state} (loads when you send a message)"


def _dot(state: str) -> str:
    return f"<span class='shoal-dot state-{state}'></span>"


def files_table(records: list[dict]) -> str:
    if not records:
        return "<p class='shoal-note'>No files yet.</p>"
    rows = []
    for r in records:
        status = r["status"]
        if status in ("queued", "parsing", "indexing"):
            status = f"{status} {int(r['progress'] * 100)}%"
        elif status == "failed":
            status = f"failed: {html.escape(r['reason'] or '')}"
        else:
            status = f"ready · {r['chunks']} passages"
        detail = r.get("language") or r.get("kind") or ""
        if r.get("pages"):
            detail += f", {r['pages']} pages"
        rows.append(f"<tr><td>{html.escape(r['name'])}</td><td>{r['size'] / 1e3:.0f} KB</td>"
                    f"<td>{html.escape(detail)}</td><td class='file-{r['status']}'>{status}</td></tr>")
    return ("<table class='shoal-files'><tr><th>file</th><th>size</th><th>type</th><th>status</th></tr>"
            + "".join(rows) + "</table>")
