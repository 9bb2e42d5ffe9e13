"""The context builder: what of a conversation (and its documents) goes into the model's window.

In order of priority: the system prompt, the latest user turn, retrieved passages (each labelled
with its source), then as much recent history as fits, whole turns only, newest first. What falls
out is reported so the caller can say so (and, with memory, retrieve it when relevant). Knows
token counts through a function it is given, nothing about models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llm_pool import Message
from llm_pool.errors import ContextOverflowError

PER_MESSAGE_OVERHEAD = 8  # tokens a chat template adds around each message (role markers, newlines)


@dataclass(frozen=True)
class Passage:
    """A piece of retrieved text and where it came from."""

    text: str
    source: str  # e.g. "report.pdf, page 3" or "main.py, lines 10-42" or "earlier in this chat"
    score: float = 0.0
    meta: dict = field(default_factory=dict)

    def citation(self) -> dict:
        """How an answer cites this passage (stored with the message, sent to clients)."""
        excerpt = " ".join(self.text.split())
        return {"source": self.source, "score": round(self.score, 3),
                "excerpt": excerpt[:300] + ("…" if len(excerpt) > 300 else ""), **self.meta}


@dataclass
class Context:
    messages: list[Message]
    prompt_tokens: int
    history_used: int  # messages of history that fit
    history_dropped: int  # messages of history left out
    passages: list[Passage]


def build_context(*, system_prompt: str, history: Sequence[Message], user_text: str,
                  count_tokens: Callable[[str], int], budget: int, max_history_messages: int | None = None,
                  passages: Sequence[Passage] = (), reply_to: str | None = None) -> Context:
    """Fit the conversation into `budget` tokens (the window minus the reply's tokens).
    `reply_to`: the user's text is the result of this tool call (a `tool` message)."""
    used = 0
    system_text = system_prompt.strip()

    def cost(text: str) -> int:
        return count_tokens(text) + PER_MESSAGE_OVERHEAD

    used += cost(user_text)
    if system_text:
        used += cost(system_text)
    if used > budget:
        raise ContextOverflowError(used, 0, budget)
    kept_passages, passage_block = [], ""
    for passage in passages:
        block = passage_block + _format_passage(len(kept_passages) + 1, passage)
        extra = count_tokens(block) - count_tokens(passage_block)
        if used + extra > budget:
            break
        kept_passages.append(passage)
        passage_block, used = block, used + extra
    chosen: list[Message] = []
    turns = _turns(history)
    limit = max_history_messages if max_history_messages is not None else len(history)
    for turn in reversed(turns):
        turn_cost = sum(cost(m.content + "".join(c.name + c.arguments for c in m.tool_calls)) for m in turn)
        if used + turn_cost > budget or len(chosen) + len(turn) > limit:
            break
        chosen = turn + chosen
        used += turn_cost
    messages = []
    system_parts = [system_text] if system_text else []
    if passage_block and reply_to:
        system_parts.append(PASSAGES_INTRO + passage_block)
    if system_parts:
        messages.append(Message("system", "\n\n".join(system_parts)))
    messages += chosen
    if reply_to:
        messages.append(Message("tool", user_text, tool_call_id=reply_to))
    else:
        # the passages go with the question, not in the system message: what comes before them
        # (the system prompt, the earlier turns) is then the same prompt as last turn's, and
        # its KV is reused (in memory, or from disk: llm_pool/kv_disk.py), as Open WebUI does
        asked = f"{PASSAGES_INTRO}{passage_block}\nQuestion: {user_text}" if passage_block else user_text
        messages.append(Message("user", asked))
    return Context(messages, used, len(chosen), len(history) - len(chosen), kept_passages)


PASSAGES_INTRO = "Use these passages to answer, and cite them by number like [1]:\n"


def passages_prompt(passages: Sequence[Passage]) -> str:
    """The passages as a system message shows them, numbered for citing."""
    return PASSAGES_INTRO + "".join(_format_passage(i + 1, p) for i, p in enumerate(passages))


def _format_passage(number: int, passage: Passage) -> str:
    return f"[{number}] ({passage.source})\n{passage.text.strip()}\n\n"


def _turns(history: Sequence[Message]) -> list[list[Message]]:
    """Group history into turns (a user message and the replies after it), keeping them whole."""
    turns: list[list[Message]] = []
    for message in history:
        if message.role == "system":
            continue
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns
