"""Thoughts apart from answers, for models that think before they answer (in `<think>` blocks).

How a model is known to reason: its chat template marks thoughts, i.e. its text holds `<think>`
or `</think>` (Qwen 3, QwQ, DeepSeek R1, SmolLM3 and most open reasoning models), read once when
the model loads (`Reasoning.of_template`, as `chat_format.knows_tools` reads tools). A catalog
entry makes any model such a one by giving it such a `chat_template`. The same reading says
whether a request may switch thinking: a template that reads `enable_thinking` (on / off) or
`reasoning_effort` (a level) gets the request's wish as that variable; other templates take
none (`Reasoning.template_kwargs` refuses it, naming the request's field).

Per request, the backend renders the prompt and says where the answer starts
(`ThoughtMarks.inside`): inside a thought when the prompt ends with the open tag (the template
opened the block, as Qwen 3's and DeepSeek R1's do), else outside, where an answer beginning
with the open tag opens one. `ThoughtSplitter` reads the answer as it streams (a tag split
across deltas included): what comes before the close tag is thought, the rest is the answer; a
block never closed is all thought. It knows nothing of protocols: the adapters show the parts
their way (reasoning_content, reasoning items, thinking blocks, the UI's folded thoughts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidParamsError

OPEN, CLOSE = "<think>", "</think>"
SWITCHES = ("enable_thinking", "reasoning_effort")  # template variables that turn thinking on, off or up


@dataclass(frozen=True)
class Thinking:
    """What a request asked of the model's thinking, and the field that asked (named in a refusal).
    `effort`: OpenAI's level (none, minimal, low, medium, high), for a template that reads it."""

    enabled: bool
    param: str
    effort: str | None = None

    @classmethod
    def of_effort(cls, effort: str | None, param: str) -> Thinking | None:
        return None if effort is None else cls(effort != "none", param, effort)


@dataclass(frozen=True)
class ThoughtMarks:
    """How this answer's thoughts are marked, and whether it starts inside one."""

    open: str = OPEN
    close: str = CLOSE
    inside: bool = False


@dataclass(frozen=True)
class Reasoning:
    """What a chat template says about thinking: whether the model reasons, and which switches
    (`SWITCHES`) it reads."""

    reasons: bool = False
    switches: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of_template(cls, template: Any) -> Reasoning:
        """`template`: the template's text, or transformers' named templates (a dict, or a list of
        {"name", "template"})."""
        texts = _texts(template)
        if not any(OPEN in t or CLOSE in t for t in texts):
            return cls()
        return cls(True, frozenset(s for s in SWITCHES if any(_reads(t, s) for t in texts)))

    def describe(self) -> dict | None:
        """For a model's status: None, or its tags and the switches it honours."""
        return {"tags": [OPEN, CLOSE], "switches": sorted(self.switches)} if self.reasons else None

    def template_kwargs(self, asked: Thinking | None) -> dict[str, Any]:
        """The variables to render the template with for this request; refuses (naming the
        request's field) a wish the template cannot honour. Thinking is on unless asked off (the
        value is always given, so both engines render the template alike)."""
        if not self.reasons:
            if asked is not None and asked.enabled:
                raise InvalidParamsError(f"{asked.param}: this model does not reason (its chat template marks no "
                                         "thoughts)", param=asked.param)
            return {}
        if asked is not None and not self.switches:
            if not asked.enabled or asked.effort is not None:
                raise InvalidParamsError(f"{asked.param}: this model always thinks; its chat template has no "
                                         "switch (enable_thinking or reasoning_effort) to change that",
                                         param=asked.param)
            return {}
        enabled = asked.enabled if asked is not None else True
        kwargs: dict[str, Any] = {}
        if "enable_thinking" in self.switches:
            kwargs["enable_thinking"] = enabled
        if "reasoning_effort" in self.switches and asked is not None and asked.effort is not None and enabled:
            kwargs["reasoning_effort"] = asked.effort
        if not enabled and "enable_thinking" not in self.switches:
            raise InvalidParamsError(f"{asked.param}: this model's chat template cannot turn thinking off "
                                     "(it reads reasoning_effort only: ask for low)", param=asked.param)
        return kwargs

    def marks(self, prompt: str) -> ThoughtMarks | None:
        """How the answer to this rendered prompt marks thoughts (None: the model does not reason)."""
        if not self.reasons:
            return None
        return ThoughtMarks(inside=prompt.rstrip().endswith(OPEN))


def _texts(template: Any) -> list[str]:
    if isinstance(template, dict):
        return [t for t in template.values() if isinstance(t, str)]
    if isinstance(template, list):
        return [t.get("template") if isinstance(t, dict) else t for t in template
                if isinstance(t.get("template") if isinstance(t, dict) else t, str)]
    return [template] if isinstance(template, str) and template else []


def _reads(template: str, name: str) -> bool:
    import jinja2
    import jinja2.meta
    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:  # a tag plain Jinja lacks ({% generation %}): read the names
        return re.search(rf"\b{name}\b", template) is not None
    return name in jinja2.meta.find_undeclared_variables(parsed)


def _held(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag` (to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThoughtSplitter:
    """An answer, fed as it streams, as (thought, answer) pieces. States: `start` (the answer
    may still open a thought), `thinking`, `answer`. Whitespace around the tags is dropped."""

    def __init__(self, marks: ThoughtMarks):
        self.marks = marks
        self.state = "thinking" if marks.inside else "start"
        self._buffer = ""
        self._began = False  # some thought or answer text went out in the current state

    @property
    def thinking(self) -> bool:
        return self.state == "thinking"

    def feed(self, text: str) -> tuple[str, str]:
        """(thought, answer) text that this delta lets out; the rest is held until it is clear."""
        self._buffer += text
        thought, answer = "", ""
        if self.state == "start":
            head = self._buffer.lstrip()
            if head.startswith(self.marks.open):
                self.state, self._buffer, self._began = "thinking", head[len(self.marks.open):], False
            elif not head or self.marks.open.startswith(head):
                return "", ""
            else:
                self.state = "answer"
        if self.state == "thinking":
            thought = self._think()
        if self.state == "answer":
            answer = self._answer()
        return thought, answer

    def _think(self) -> str:
        if not self._began:
            self._buffer = self._buffer.lstrip()
        at = self._buffer.find(self.marks.close)
        if at >= 0:
            out, self._buffer = self._buffer[:at].rstrip(), self._buffer[at + len(self.marks.close):]
            self.state, self._began = "answer", False
            return out
        keep = _held(self._buffer, self.marks.close)
        cut = len(self._buffer) - keep
        cut = len(self._buffer[:cut].rstrip())  # trailing whitespace waits: it may precede the close tag
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        self._began = self._began or bool(out)
        return out

    def _answer(self) -> str:
        if not self._began:
            self._buffer = self._buffer.lstrip()
            self._began = bool(self._buffer)
        out, self._buffer = self._buffer, ""
        return out

    def flush(self) -> tuple[str, str]:
        """At the end: what was held. A thought never closed is all thought."""
        rest, self._buffer = self._buffer, ""
        if self.state == "thinking":
            return (rest.rstrip() if self._began else rest.strip()), ""
        if self.state == "start":
            return "", rest
        return "", rest if self._began else rest.lstrip()


def split(text: str, marks: ThoughtMarks | None) -> tuple[str, str]:
    """A whole answer as (thought, answer); ("", text) for a model that does not reason."""
    if marks is None:
        return "", text
    splitter = ThoughtSplitter(marks)
    thought, answer = splitter.feed(text)
    more_thought, more_answer = splitter.flush()
    return thought + more_thought, answer + more_answer


__all__ = ["CLOSE", "OPEN", "Reasoning", "ThoughtMarks", "ThoughtSplitter", "Thinking", "split"]
