"""How a chat, tool turns included, becomes the messages a chat template renders.

Two ways, chosen per model by what its chat template can do:

- **the model's own template** when it renders `tools` (Qwen 2.5, Hermes, Llama 3.1, SmolLM3 and
  most recent instruct models do): the tools, an assistant's `tool_calls` and `tool` messages go
  to the template in OpenAI's shape, so the model reads them laid out as it was trained to;
- **Shoal's generic format** otherwise (the shipped models' templates know nothing of tools): the
  tools are described in the system message (`GenerationRequest.tool_prompt`, written by the
  server), an assistant's calls become their JSON, and a tool result becomes a user turn.

Either way the server reads the answer the same way (`server/tool_calls.py`): a JSON object
naming a tool, or one or more `<tool_call>` blocks holding such objects.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .constraints import OutputFormat
from .errors import InvalidParamsError
from .grammar_bounds import MAX_CONSTRAINED_TOOLS, GrammarBoundError

TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
TOOL_RESULT = "The tool {name} returned: {result}\nUse this result to answer my question in plain words."


@dataclass(frozen=True)
class ToolCall:
    """An assistant's call of a function, as the client sent it back in the history."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def knows_tools(template: Any) -> bool:
    """Whether a chat template renders the `tools` variable. `template` is the template's text, or
    transformers' named templates (a dict, or a list of {"name", "template"})."""
    if isinstance(template, dict):
        return any(knows_tools(t) for t in template.values())
    if isinstance(template, list):
        return any(knows_tools(t.get("template") if isinstance(t, dict) else t) for t in template)
    if not isinstance(template, str) or not template:
        return False
    import jinja2
    import jinja2.meta
    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:  # a tag plain Jinja lacks ({% generation %}): read the names
        return re.search(r"\btools\b", template) is not None
    return "tools" in jinja2.meta.find_undeclared_variables(parsed)


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON: shown as the text the client sent


def _call_text(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "arguments": _parsed(call.arguments)})


def generic_messages(messages: list, tool_prompt: str | None = None) -> list[dict[str, str]]:
    """Plain role/content turns for a template that knows nothing of tools."""
    names: dict[str, str] = {}
    out: list[dict[str, str]] = []
    for m in messages:
        text = m.content
        if m.role == "assistant" and m.tool_calls:
            names.update((c.id, c.name) for c in m.tool_calls)
            text = "\n".join(([text] if text else []) + [_call_text(c) for c in m.tool_calls])
        if m.role == "tool":
            name = names.get(m.tool_call_id or "", m.tool_call_id)
            out.append({"role": "user", "content": TOOL_RESULT.format(name=name, result=text)})
        else:
            out.append({"role": m.role, "content": text})
    if tool_prompt:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tool_prompt}"}
        else:
            out.insert(0, {"role": "system", "content": tool_prompt})
    return out


def template_messages(messages: list, object_arguments: bool) -> list[dict[str, Any]]:
    """OpenAI-shaped turns for a template that knows tools. `object_arguments`: a call's arguments
    as a JSON object (what transformers' templates expect) rather than JSON text (llama.cpp's
    server takes the text and converts it for templates that need it)."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                names[c.id] = c.name
                arguments = _parsed(c.arguments) if object_arguments else c.arguments
                calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
            entry["tool_calls"] = calls
        if m.role == "tool":
            entry["tool_call_id"] = m.tool_call_id
            entry["name"] = names.get(m.tool_call_id or "", m.tool_call_id)
        out.append(entry)
    return out


def tool_prompt(functions: list[dict], choice: str = "auto") -> str:
    """The generic format's description of the tools (OpenAI function objects) for the system
    message; `choice`: auto, required, or the name of the one function offered."""
    lines = ["You can call these tools (arguments as JSON Schema):"]
    for f in functions:
        described = f" - {f['description']}" if f.get("description") else ""
        lines.append(f"- {f['name']}{described}. Arguments: {json.dumps(f.get('parameters') or {'type': 'object'})}")
    lines.append('To call a tool, reply with only a JSON object and nothing else: '
                 '{"name": "<tool name>", "arguments": {...}}.')
    if choice == "auto":
        lines.append("If no tool is needed, answer normally.")
    elif choice == "required":
        lines.append("Call one of the tools now.")
    else:
        lines.append(f"Call the tool {choice} now.")
    return "\n".join(lines)


def call_format(functions: list[dict], choice: str) -> OutputFormat | None:
    """required / a named function: the answer is decoded as one call of an offered function
    (its arguments following the function's schema); auto: None."""
    if choice == "auto":
        return None
    if len(functions) > MAX_CONSTRAINED_TOOLS:
        raise GrammarBoundError(f"tools: {len(functions)} tools with tool_choice '{choice}'; a constrained call may "
                                f"choose from at most {MAX_CONSTRAINED_TOOLS} (offer fewer, or use tool_choice "
                                "auto)", param="tools")
    schemas = [{"type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    return OutputFormat.json(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, param="tools")


def parse_calls(text: str, names: set[str], parallel: bool = True) -> list[dict] | None:
    """An answer as OpenAI `tool_calls`, or None when it is not only calls of the named tools: a
    JSON object (optionally in a ```json fence; "parameters" accepted for "arguments", as Llama
    3.1 writes it), or only `<tool_call>` blocks holding such objects (several: parallel calls;
    `parallel=False` keeps the first)."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
    if fenced:
        body = fenced.group(1)
    tagged = TAGGED.findall(body)
    if tagged and not TAGGED.sub("", body).strip():
        objects = tagged
    elif body.startswith("{"):
        objects = [body]
    else:
        return None
    calls = [_call(o, names) for o in objects]
    if not calls or None in calls:
        return None
    return calls if parallel else calls[:1]


def _call(text: str, names: set[str]) -> dict | None:
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    arguments = call.get("arguments", call.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments)}}


def may_be_call(text: str) -> bool:
    """While streaming: could an answer beginning like this still turn out to be a call?"""
    start = text.lstrip()
    return not start or start[0] == "{" or any(p.startswith(start[:len(p)]) for p in ("```", "<tool_call>"))


def check_turns(request) -> None:
    """`continue_final_message` continues the last message, which must be the assistant's own
    text; it cannot also open a new turn (`add_generation_prompt`), as in vLLM and llama.cpp."""
    if not request.continue_final_message:
        return
    name = "continue_final_message"
    if request.add_generation_prompt:
        raise InvalidParamsError(f"{name}: not with add_generation_prompt true (send add_generation_prompt: "
                                 "false to continue the last message)", param=name)
    last = request.messages[-1] if request.messages else None
    if last is None or last.role != "assistant":
        raise InvalidParamsError(f"{name}: the last message must be an assistant message (the text to "
                                 "continue)", param=name)
    if last.tool_calls:
        raise InvalidParamsError(f"{name}: an assistant message with tool_calls cannot be continued", param=name)


def render(request, native: bool, object_arguments: bool = True) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """The turns to hand a chat template, and the tools to hand it (None for the generic format)."""
    check_turns(request)
    if native:
        return template_messages(request.messages, object_arguments), request.tools or None
    return generic_messages(request.messages, request.tool_prompt), None


__all__ = ["TOOL_RESULT", "ToolCall", "call_format", "check_turns", "generic_messages", "knows_tools", "may_be_call",
           "parse_calls", "render", "template_messages", "tool_prompt"]


@dataclass(frozen=True)
class ToolPlan:
    """Which functions a reply may call and how, decided in one place for every route (chat
    completions, Responses, Messages, sessions and the UI): `functions` are OpenAI function objects
    (name, description, parameters); `choice` is auto, required or one function's name."""

    functions: list[dict]
    choice: str = "auto"
    parallel: bool = True

    @property
    def offered(self) -> list[dict]:
        if self.choice in ("auto", "required"):
            return self.functions
        return [f for f in self.functions if f["name"] == self.choice]

    def prompt(self) -> str:
        return tool_prompt(self.offered, self.choice)

    def tool_dicts(self) -> list[dict]:
        """The offered tools as OpenAI tool objects, for a chat template that renders them."""
        return [{"type": "function", "function": {k: v for k, v in f.items() if k != "strict"}} for f in self.offered]

    def output_format(self) -> OutputFormat | None:
        """required / named: the answer is decoded as a call of an offered tool."""
        return call_format(self.offered, self.choice)

    def parse(self, text: str) -> list[dict] | None:
        """The answer as OpenAI `tool_calls`, or None when it is not a call of offered tools."""
        return parse_calls(text, {f["name"] for f in self.offered}, self.parallel)

    def after_result(self) -> ToolPlan:
        """The turn that reads a tool's result answers freely (auto), whatever forced the call."""
        return ToolPlan(self.functions, "auto", self.parallel)

    @staticmethod
    def may_be_call(text: str) -> bool:
        """While streaming with auto: could this beginning still turn out to be a call?"""
        return may_be_call(text)
