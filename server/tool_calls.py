"""Tool calling in OpenAI's shape, on any chat model, in one documented generic format.

The shipped models' chat templates know nothing of tools, so Shoal describes the tools in a
system message and asks for a call as one JSON object, `{"name": ..., "arguments": {...}}`:

- `tool_choice: "required"` or a named function: the answer is *constrained* to such an object
  (the arguments to the function's JSON schema) while it is decoded, so it always parses;
- `"auto"` (the default when tools are given): the model answers freely; an answer that is
  exactly such an object (optionally in a ```json fence) naming a given tool is a call;
- `"none"`: the tools are not described and the answer is text.

History goes back the same way: an assistant message's `tool_calls` become that JSON, and a
`tool` message becomes a user turn (`TOOL_RESULT`) asking for an answer from it. One call per answer:
`parallel_tool_calls` is accepted (the model may make up to one call per turn).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_pool import Message
from llm_pool.constraints import OutputFormat
from llm_pool.errors import InvalidParamsError

NAME = r"^[A-Za-z0-9_-]{1,64}$"
TOOL_RESULT = "The tool {name} returned: {result}\nUse this result to answer my question in plain words."


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict | None = Field(None, description="JSON Schema of the arguments.")
    strict: bool | None = Field(None, description="Accepted; with required or a named tool the schema "
                                "is always enforced.")


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str = Field(pattern=NAME)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(BaseModel):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1_000_000, description="The arguments, as a JSON string.")


class ToolCallIn(BaseModel):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # shown as the text it is


def history(messages: list) -> list[Message]:
    """Request messages (`ChatMessageIn`) as the engine's plain messages, tool turns included."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        text = m.text()
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for call in m.tool_calls:
                names[call.id] = call.function.name
                calls.append(json.dumps({"name": call.function.name, "arguments": _arguments(call.function.arguments)}))
            text = "\n".join(([text] if text else []) + calls)
        if m.role == "tool":
            out.append(Message("user", TOOL_RESULT.format(name=names.get(m.tool_call_id, m.tool_call_id), result=text)))
        else:
            out.append(Message("system" if m.role == "developer" else m.role, text))
    return out


def call_schema(function: FunctionDef) -> dict:
    return {"type": "object",
            "properties": {"name": {"const": function.name},
                           "arguments": function.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


@dataclass
class ToolPlan:
    tools: list[ToolDef]
    choice: str  # auto | required | the name of one function

    @classmethod
    def of(cls, tools: list[ToolDef] | None, choice: str | NamedToolChoice | None) -> ToolPlan | None:
        if isinstance(choice, NamedToolChoice):
            choice = choice.function.name
            if not tools or choice not in {t.function.name for t in tools}:
                raise InvalidParamsError(f"tool_choice: '{choice}' is not one of the request's tools",
                                         param="tool_choice")
        if choice == "required" and not tools:
            raise InvalidParamsError("tool_choice: 'required' needs tools", param="tool_choice")
        if not tools or choice == "none":
            return None
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise InvalidParamsError("tools: two tools have the same name", param="tools")
        for i, tool in enumerate(tools):
            if tool.function.parameters is not None:
                OutputFormat.json(tool.function.parameters, param=f"tools.{i}.function.parameters")
        return cls(tools, choice or "auto")

    @property
    def offered(self) -> list[FunctionDef]:
        if self.choice in ("auto", "required"):
            return [t.function for t in self.tools]
        return [t.function for t in self.tools if t.function.name == self.choice]

    def prompt(self) -> str:
        lines = ["You can call these tools (arguments as JSON Schema):"]
        for f in self.offered:
            described = f" - {f.description}" if f.description else ""
            lines.append(f"- {f.name}{described}. Arguments: {json.dumps(f.parameters or {'type': 'object'})}")
        lines.append('To call a tool, reply with only a JSON object and nothing else: '
                     '{"name": "<tool name>", "arguments": {...}}.')
        if self.choice == "auto":
            lines.append("If no tool is needed, answer normally.")
        elif self.choice == "required":
            lines.append("Call one of the tools now.")
        else:
            lines.append(f"Call the tool {self.choice} now.")
        return "\n".join(lines)

    def messages(self, plain: list[Message]) -> list[Message]:
        if plain and plain[0].role == "system":
            return [Message("system", f"{plain[0].content}\n\n{self.prompt()}"), *plain[1:]]
        return [Message("system", self.prompt()), *plain]

    def output_format(self) -> OutputFormat | None:
        """required / named: the answer is decoded as a call of an offered tool."""
        if self.choice == "auto":
            return None
        schemas = [call_schema(f) for f in self.offered]
        return OutputFormat.json(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, param="tools")

    def parse(self, text: str) -> list[dict] | None:
        """The answer as OpenAI `tool_calls`, or None when it is not a call of an offered tool."""
        body = text.strip()
        fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
        if fenced:
            body = fenced.group(1)
        if not body.startswith("{"):
            return None
        try:
            call = json.loads(body)
        except ValueError:
            return None
        offered = {f.name for f in self.offered}
        if not isinstance(call, dict) or call.get("name") not in offered or not isinstance(call.get("arguments"), dict):
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]

    def may_be_call(self, text: str) -> bool:
        """While streaming with auto: could this beginning still turn out to be a call?"""
        start = text.lstrip()
        return not start or start[0] == "{" or "```".startswith(start[:3]) or start.startswith("```")
