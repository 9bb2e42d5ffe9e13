"""What a generation looks like from outside: requests in, a stream of events out.

A `GenerationHandle` is filled by a producer thread (an engine or a remote backend) and read by
one consumer, synchronously (`for event in handle`) or asynchronously (`async for event in
handle`). Cancelling it (client gone, stop button, API call) tells the producer to stop; the
stream then ends with a `Finished` event whose reason is "cancelled". The handle knows nothing
about models or tokenizers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from .chat_format import ToolCall
from .constraints import OutputFormat
from .errors import ShoalError
from .params import GenerationParams
from .reasoning import Thinking, ThoughtMarks

_ids = itertools.count(1)
log = logging.getLogger("shoal.stream")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


@dataclass
class GenerationRequest:
    """A prompt for one model: `messages` for chat models, `prompt` for raw completion."""

    params: GenerationParams
    messages: list[Message] | None = None
    prompt: str | None = None
    request_id: str = field(default_factory=lambda: f"gen-{next(_ids)}")
    queue_timeout: float | None = None
    cache_key: str | None = None  # e.g. a session id: hints that a later turn will reuse the prefix
    # Whose cached prefixes this request may reuse and add to: a user id, or an explicit
    # cache_salt group. None: nothing is shared with anyone (anonymous callers).
    cache_scope: str | None = None
    want_logprobs: bool = False  # the caller reads TextDelta.logprobs (engines may skip computing them)
    top_logprobs: int = 0  # the caller reads TextDelta.top: this many alternatives per token
    output_format: OutputFormat | None = None  # structured output, enforced while decoding
    # Tools the model may call (see chat_format): OpenAI's tool objects, for a chat template that
    # renders them, and the same described in words, for one that does not
    tools: list[dict] | None = None
    tool_prompt: str | None = None
    # How a chat is rendered (vLLM's fields): open a new assistant turn after the messages, or
    # leave the last (assistant) message open so that the answer continues it (chat_format.check_turns)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # Thinking on or off (or a level), for a model whose chat template switches it (see reasoning);
    # None: the model's default
    thinking: Thinking | None = None
    # Filled by the backend as it renders the chat: how the answer marks thoughts (None: the model
    # does not reason), so that adapters can show them apart
    thoughts: ThoughtMarks | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    disk_tokens: int = 0  # of the cached tokens, those read back from disk (kv_disk)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]  # the tokens this delta covers (a character may span several)
    logprobs: tuple[float, ...] = ()  # log-probability of each of those tokens under the model
    # with want_logprobs: each token's own bytes (a character may be split across tokens), and with
    # top_logprobs: the most likely alternatives at each of those positions, (bytes, logprob) best first
    token_bytes: tuple[bytes, ...] = ()
    top: tuple[tuple[tuple[bytes, float], ...], ...] = ()

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled | error
    usage: Usage
    text: str  # the whole generated text
    model: str = ""
    ttft: float | None = None  # seconds from submit to the first token
    duration: float = 0.0  # seconds from submit to the end
    queued: float = 0.0  # seconds spent waiting for a batch slot
    stopped_by: str | None = None  # for reason "stop": "eos" or "stop_sequence"
    stop_sequence: str | None = None  # which one, when a stop sequence ended it

    @property
    def tokens_per_second(self) -> float:
        span = self.duration - (self.ttft or 0.0)
        if self.usage.completion_tokens <= 1 or span <= 0:
            return 0.0
        return (self.usage.completion_tokens - 1) / span


@dataclass(frozen=True)
class Failed:
    error: ShoalError


Event = TextDelta | Finished | Failed


class _Listener:
    """A consumer of a handle's events on an event loop. `woken`: a wake-up is on its way and it has
    not yet read what is queued, so further events need none (under load a stream's tokens arrive
    faster than its loop reads them: one cross-thread wake-up, not one per token)."""
    __slots__ = ("flag", "loop", "woken")

    def __init__(self, loop: asyncio.AbstractEventLoop, flag: asyncio.Event):
        self.loop, self.flag, self.woken = loop, flag, False


class GenerationHandle:
    """One generation's event stream, with cancellation. Thread-safe producer side."""

    def __init__(self, request: GenerationRequest, model: str = ""):
        self.request = request
        self.model = model
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self._done = False
        self._cancelled = threading.Event()
        self._waiters: list[_Listener] = []
        self._on_done: list[Callable[[GenerationHandle], None]] = []
        self._on_cancel: list[Callable[[], None]] = []
        self._final: Finished | Failed | None = None

    @property
    def id(self) -> str:
        return self.request.request_id

    # producer side ---------------------------------------------------------------------------
    def push(self, event: Event) -> None:
        callbacks: list[Callable[[GenerationHandle], None]] = []
        with self._cond:
            if self._done:
                return
            if isinstance(event, TextDelta) and self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._events.append(event)
            if isinstance(event, (Finished, Failed)):
                self._done = True
                self._final = event
                callbacks, self._on_done = self._on_done, []
            self._cond.notify_all()
            waiters = [w for w in self._waiters if not w.woken]  # one wake-up until it has read
            for waiter in waiters:
                waiter.woken = True
        for waiter in waiters:
            try:
                waiter.loop.call_soon_threadsafe(waiter.flag.set)
            except RuntimeError:  # the consumer's loop is closed; nobody is listening
                pass
        for callback in callbacks:
            _run_callback(callback, self)

    def fail(self, error: ShoalError) -> None:
        self.push(Failed(error))

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done

    @property
    def final(self) -> Finished | Failed | None:
        """The last event, once the generation is over."""
        return self._final

    def on_done(self, callback: Callable[[GenerationHandle], None]) -> None:
        with self._cond:
            if not self._done:
                self._on_done.append(callback)
                return
        _run_callback(callback, self)

    # consumer side ---------------------------------------------------------------------------
    def cancel(self) -> None:
        with self._cond:
            if self._cancelled.is_set():
                return
            self._cancelled.set()
            callbacks, self._on_cancel = self._on_cancel, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a producer that already went away
                log.exception("cancel callback of %s failed", self.id)

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the cancelling thread) when the handle is cancelled, at once if it
        already is; returns what removes it (a producer that finished no longer wants it). Engines
        stop a generation on this instead of polling `cancelled`."""
        with self._cond:
            if not self._cancelled.is_set():
                self._on_cancel.append(callback)
                return lambda: self._forget_cancel(callback)
        callback()
        return lambda: None

    def _forget_cancel(self, callback: Callable[[], None]) -> None:
        with self._cond:
            if callback in self._on_cancel:
                self._on_cancel.remove(callback)

    def _pop(self) -> Event | None:
        with self._cond:
            return self._events.popleft() if self._events else None

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait(0.5)
                event = self._events.popleft()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        me = _Listener(asyncio.get_running_loop(), asyncio.Event())
        with self._cond:
            self._waiters.append(me)
        try:
            while True:
                event = self._pop()
                if event is None:
                    me.flag.clear()
                    with self._cond:
                        me.woken = False
                    event = self._pop()  # re-check: a push may have raced the clear
                    if event is None:
                        await me.flag.wait()
                        continue
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            with self._cond:
                self._waiters.remove(me)

    def result(self, timeout: float | None = None) -> Finished:
        """Block until the end; return the final event or raise the generation's error."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"generation {self.id} did not finish in {timeout} s")
            final = self._final
        if isinstance(final, Failed):
            raise final.error
        assert isinstance(final, Finished)
        return final

    async def aresult(self) -> Finished:
        final: Finished | None = None
        async for event in self:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                final = event
        assert final is not None
        return final


def _run_callback(callback: Callable[[GenerationHandle], None], handle: GenerationHandle) -> None:
    """A raising callback is logged; it never reaches the producer (an engine step of every
    other request). Callbacks must be quick: slow work belongs in a thread of their own."""
    try:
        callback(handle)
    except Exception:
        log.exception("a completion callback of %s failed", handle.id)
