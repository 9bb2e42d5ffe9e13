"""Tool calling in OpenAI's shape, on any chat model.

How the tools reach the model depends on its chat template (`llm_pool/chat_format.py`): a
template that renders `tools` gets them, and the tool turns, as they are; for one that does not
(the shipped models), Shoal describes the tools in a system message (`ToolPlan.prompt`) and asks
for a call as one JSON object, `{"name": ..., "arguments": {...}}`. Either way:

- `tool_choice: "required"` or a named function: the answer is *constrained* to such an object
  (the arguments to the function's JSON schema) while it is decoded, so it always parses;
- `"auto"` (the default when tools are given): the model answers freely; an answer that is
  exactly such an object (optionally in a ```json fence), or one or more `<tool_call>` blocks
  holding such objects (the format of Qwen/Hermes-style templates), naming given tools, is a call;
- `"none"`: the tools are not shown and the answer is text.

An assistant message's `tool_calls` and `tool` messages go back in the history (see chat_format).
`parallel_tool_calls`: an answer in `<tool_call>` blocks may make several calls; `false` keeps the
first. A constrained answer makes one call.

A model that thinks first (`llm_pool/reasoning.py`) has its thoughts taken apart before any of
this: they come as `Thought`s, and only the answer after them may be a call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_pool import Message, chat_format
from llm_pool.chat_format import ToolCall
from llm_pool.constraints import OutputFormat
from llm_pool.errors import InvalidParamsError
from llm_pool.reasoning import ThoughtMarks, ThoughtSplitter
from llm_pool.stream import Failed, Finished, GenerationHandle

from .streaming import Chunk, chunked, joined

NAME = r"^[A-Za-z0-9_-]{1,64}$"


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

    @classmethod
    def of(cls, name: str, description: str | None, parameters: dict | None) -> ToolDef:
        """A function tool declared the way another protocol declares it (Anthropic, Responses)."""
        return cls(type="function", function=FunctionDef(name=name, description=description, parameters=parameters))


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


def history(messages: list) -> list[Message]:
    """Request messages (`ChatMessageIn`) as the engine's messages, tool turns included."""
    return [Message("system" if m.role == "developer" else m.role, m.text(),
                    tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()),
                    m.tool_call_id if m.role == "tool" else None)
            for m in messages]


class ToolPlan(chat_format.ToolPlan):
    """The core's tool plan (`chat_format.ToolPlan`), made from a request's checked tools."""

    @classmethod
    def of(cls, tools: list[ToolDef] | None, choice: str | NamedToolChoice | None,
           parallel: bool | None = None) -> ToolPlan | None:
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
        return cls([t.function.model_dump(exclude_none=True) for t in tools], choice or "auto", parallel is not False)


def session_tools(tools: list[ToolDef] | None) -> list[dict] | None:
    """A chat session's tools, checked (names unique, schemas compilable) and kept as OpenAI tool
    objects; None: unchanged."""
    if tools is None:
        return None
    plan = ToolPlan.of(tools, "auto")
    return plan.tool_dicts() if plan else []


@dataclass(frozen=True)
class Calls:
    """The answer was tool calls (OpenAI `tool_calls` dicts); `pieces`: the text they were read from."""
    calls: list[dict]
    pieces: list[Chunk]


@dataclass(frozen=True)
class Thought:
    """A piece of the model's thinking before its answer; `tokens`: the tokens it took (a last
    Thought may bring only tokens, those of the close tag, with no text)."""
    text: str
    tokens: int


class ThoughtReader:
    """An answer's Chunks as Thoughts and the answer's Chunks (reasoning.ThoughtSplitter). A
    chunk's tokens count as thought when it began inside the thought or let some out."""

    def __init__(self, marks: ThoughtMarks):
        self.splitter = ThoughtSplitter(marks)
        self.tokens = 0  # thought tokens not yet given out with a Thought
        self.total = 0  # every thought token so far

    def read(self, chunk: Chunk) -> list[Thought | Chunk]:
        was_thinking = self.splitter.thinking
        thought, answer = self.splitter.feed(chunk.text)
        if was_thinking or thought:
            self.tokens += len(chunk.token_ids)
        return self._out(thought, answer, chunk)

    def end(self) -> list[Thought | Chunk]:
        thought, answer = self.splitter.flush()
        return self._out(thought, answer, Chunk("", (), ()), last=True)

    def _out(self, thought: str, answer: str, chunk: Chunk, last: bool = False) -> list[Thought | Chunk]:
        out: list[Thought | Chunk] = []
        if thought or (last and self.tokens):
            out.append(Thought(thought, self.tokens))
            self.total += self.tokens
            self.tokens = 0
        if answer:
            out.append(Chunk(answer, chunk.token_ids, chunk.logprobs, chunk.token_bytes, chunk.top))
        return out


def thoughts_of(chunks: list[Chunk], marks: ThoughtMarks | None) -> tuple[str, list[Chunk], int]:
    """A whole answer's chunks as (thought, the answer's chunks, thought tokens)."""
    if marks is None:
        return "", chunks, 0
    reader = ThoughtReader(marks)
    parts = [p for c in chunks for p in reader.read(c)] + reader.end()
    return ("".join(p.text for p in parts if isinstance(p, Thought)), [p for p in parts if isinstance(p, Chunk)],
            reader.total)


async def _thoughts_apart(stream: AsyncIterator, marks: ThoughtMarks | None) -> AsyncIterator:
    if marks is None:
        async for item in stream:
            yield item
        return
    reader = ThoughtReader(marks)
    async for item in stream:
        parts = reader.read(item) if isinstance(item, Chunk) else [*reader.end(), item]
        for part in parts:
            yield part


async def answer_events(handle: GenerationHandle, plan: ToolPlan | None, chunk_size: int = 1, delay_ms: int = 0
                        ) -> AsyncIterator[Thought | Chunk | Calls | Finished | Failed]:
    """A chat answer as every protocol streams it: first the model's Thoughts (a model that
    thinks), then text as Chunks, or Calls, then Finished or Failed.

    With tools, an answer that may be a call is held back: with `auto`, until its beginning shows
    it is text (then streamed as it comes); otherwise to the end, where it is read as calls (or,
    failing that, sent as text)."""
    held: list[Chunk] | None = [] if plan else None
    async for item in _thoughts_apart(chunked(handle, chunk_size, delay_ms), handle.request.thoughts):
        if isinstance(item, Thought):
            yield item
        elif isinstance(item, Chunk) and held is not None:
            held.append(item)
            if plan.choice == "auto" and not plan.may_be_call("".join(c.text for c in held)):
                for piece in held:  # plain text after all: stream it as it comes
                    yield piece
                held = None
        elif isinstance(item, Finished) and held:
            whole = joined(held)
            calls = plan.parse(whole.text) if item.reason == "stop" else None
            yield Calls(calls, held) if calls else whole
            yield item
        else:
            yield item
