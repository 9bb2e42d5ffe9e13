"""A GGUF model run by llama.cpp: a private `llama-server` process per loaded model version.

Why a process and not in-process bindings: llama.cpp's server already batches many sequences
continuously over its slots (a KV per slot, or one unified KV: `_plan_context`), runs on this
CPU at 5-6x the transformers engine for the shipped quantized models, and a crash of native
code in it is a failed model, not a dead Shoal. The pool starts it on a free loopback port with
a random key (other local processes cannot use it), sizes its KV from the pool's budget, stops
it on unload, and notices when it dies (requests in flight end with an error; the next request
loads it again).

Shoal keeps what the server does not know about: who may reuse which cached prefix. Each request
is sent to a slot Shoal picks (`id_slot`); a slot remembers whose prompt its KV holds, and a
request may reuse it (`cache_prompt`) only when it comes from the same cache scope (a user, or an
agreed `cache_salt`). Otherwise the slot's KV is recomputed from scratch, so no caller can see,
time or infer another's prompt. The server's cross-slot RAM cache is off for the same reason.
Prompts are tokenized here (the server's own tokenizer and chat template, over its API), so
context checks, queue limits, token ids and usage work as on the transformers engine.

The parts: `llamacpp_gguf` (the GGUF header), `llamacpp_server` (the process), `llamacpp_slots`
(which slot a request goes to), `llamacpp_protocol` (requests and events to and from the server's
API); this module sizes the KV and runs the queue. `llamacpp_embedding` runs embedding models.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx

from .. import chat_format, llamacpp_build
from ..errors import (
    ContextOverflowError,
    InvalidParamsError,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
    QueueTimeoutError,
    ServiceUnavailableError,
    ShoalError,
)
from ..reasoning import Reasoning
from ..sources import locate_gguf
from ..stream import Finished, GenerationHandle, GenerationRequest, Usage
from .base import Backend, Progress, check_logit_bias, check_token_ids
from .llamacpp_gguf import gguf_facts
from .llamacpp_protocol import (
    UpstreamRefused,
    completion_body,
    delta_of,
    error_message,
    prompt_piece_body,
    stream_lines,
)
from .llamacpp_server import LlamaServer
from .llamacpp_slots import Slot, Waiter, common_prefix, pick_slot

# prompt tokens per step of a long prompt read beside running streams (at most half a batch):
# at 6k tokens of context a step of 128 took ~1.0 s here (p50 gap of the running streams), of 256 ~1.5 s
PIECE_TOKENS = 128
RESTORE_MIN_TOKENS = 256  # a chat's KV is read from disk when that saves computing more than this
log = logging.getLogger("shoal.llamacpp")
DEFAULT_MAX_NEW_TOKENS = 512
COMPUTE_BYTES = 96 * 2**20  # llama.cpp's compute buffers and the process itself, before measuring




class LlamaCppBackend(Backend):
    engine_name = "llama.cpp"

    def __init__(self, spec, context):
        super().__init__(spec, context)
        self._gguf: Path | None = None
        self._facts: dict[str, int] = {}
        self._binary: Path | None = None
        self.slots = max(1, context.engine.max_batch_size)
        self._threads = max(1, len(os.sched_getaffinity(0)))
        self._server: LlamaServer | None = None
        self._template_file: str | None = None
        self._http: httpx.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._slots: list[Slot] = []
        self.read_in_pieces = True  # long prompts beside running streams: half a batch per step
        self._queue: deque[Waiter] = deque()
        self._running: dict[int, asyncio.Task] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # counts seen from submit() (any thread)
        self._active = 0  # submitted and not finished (running + waiting)
        self.lost: str | None = None  # why the server stopped on its own
        self._ctx_total = 0
        self._ctx_slot = 0
        self._split = False
        self._batch = 512
        self._piece = PIECE_TOKENS
        self._measured = 0
        self._kv = None  # kv_disk.ModelKv: chats' KV saved through the server's slot save/restore
        self.stats = {"requests": 0, "cache_reused_tokens": 0, "peak_running": 0}

    # ------------------------------------------------------------------ sizing
    def _bytes_per_token(self) -> int:
        f = self._facts
        return max(1, f["layers"] * f["kv_heads"] * (f["key_dim"] + f["value_dim"]) * 2)  # f16 K and V

    def _plan_context(self) -> None:
        """Per request: the model's window (catalog or GGUF). The layout, from the KV cap:
        - one KV per slot, each the whole window (`-c window x slots`), when the cap holds it:
          a stream's attention runs over its own cells only (measured with bench/kv_layouts.py
          at 16 and 32 clients: 10-15% more tok/s than the unified KV, and what a plain
          `llama-server -np N` does);
        - else one unified KV of what the cap holds (at least one window), each slot up to the
          window (`-kvu --kv-unified-per-slot`): every stream's attention spans all streams'
          cells, but any request may use the whole window.
        K and V stay f16: q8_0 halves the bytes but measured no faster here (with or without
        flash attention)."""
        engine = self.context.engine
        window = min(self.spec.context_length or self._facts["context"], self._facts["context"] * 4)
        self._ctx_slot = int(window) // 256 * 256 or 256
        cap = engine.llamacpp_kv_bytes if engine.llamacpp_kv_bytes is not None else engine.kv_cache_bytes
        split = self._ctx_slot * self.slots
        self._split = engine.layout == "ragged" or (engine.layout == "auto"
                                                    and split <= cap // self._bytes_per_token())
        if self._split:
            self._ctx_total = split
        else:  # the engine's KV budget (512 MiB by default), at least one window
            budget_tokens = engine.kv_cache_bytes // self._bytes_per_token()
            total = max(window, min(budget_tokens, window * self.slots))
            self._ctx_total = max(self._ctx_slot, int(total) // 256 * 256)
        self._batch = max(16, engine.llamacpp_batch)
        self._piece = max(16, min(PIECE_TOKENS, self._batch // 2))

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, progress: Progress) -> None:
        self._binary = llamacpp_build.find_server()
        if self._binary is None:
            raise ModelLoadError(f"model '{self.spec.key}' runs on llama.cpp, which is not built on this "
                                 "machine yet (python -m llm_pool.llamacpp_build build; ~10 minutes)",
                                 code="engine_unavailable")
        progress(0.05, "locating GGUF")
        self._gguf = locate_gguf(self.spec, self.context.cache_dir, self.context.policy)
        try:
            self._facts = gguf_facts(self._gguf)
        except Exception as exc:  # a GGUF the reader cannot parse will not load either
            log.warning("model %s: reading the GGUF header failed: %s", self.spec.key, exc)
            raise ModelLoadError(f"model '{self.spec.key}': the GGUF header cannot be read "
                                 f"({type(exc).__name__})") from exc
        self._plan_context()

    def estimate_bytes(self) -> int:
        weights = self._gguf.stat().st_size if self._gguf else 0
        return weights + self._ctx_total * self._bytes_per_token() + COMPUTE_BYTES

    def load(self, progress: Progress) -> None:
        assert self._gguf is not None and self._binary is not None, "prepare() first"
        progress(0.5, "starting llama.cpp")
        args = ["-m", str(self._gguf), "-a", self.spec.key, "-np", str(self.slots), "-c", str(self._ctx_total),
                "-t", str(self._threads), "-tb", str(self._threads), "--cache-ram", "0", "--no-webui", "--jinja",
                "--no-slots", "--slot-prompt-similarity", "0",
                # a chat ending with an assistant message gets a new turn, as on transformers; continuing
                # that message is asked for (continue_final_message), not guessed
                "--no-prefill-assistant",
                # prompt tokens per step: a burst of new prompts is read in few steps; a long prompt
                # arriving beside running streams is read PIECE_TOKENS per step (_read_in_pieces)
                "-b", str(self._batch), "-ub", str(min(self._batch, 512))]
        if not self._split:
            args += ["-kvu", "--kv-unified-per-slot", str(self._ctx_slot)]
        if self.context.kv_disk is not None:
            weights = self._gguf.stat()
            identity = f"llama.cpp|{llamacpp_build.VERSION}|{self._gguf.name}|{weights.st_size}|{weights.st_mtime_ns}"
            self._kv = self.context.kv_disk.for_model(self.spec.key, identity)
            args += ["--slot-save-path", str(self._kv.folder)]
        if self.spec.chat_template:
            handle, self._template_file = tempfile.mkstemp(suffix=".jinja")
            with os.fdopen(handle, "w") as out:
                out.write(self.spec.chat_template)
            args += ["--chat-template-file", self._template_file]
        self._server = LlamaServer(self._binary, args, self.spec.key, self.context.cache_dir / "llama.cpp-logs")
        self._http = self._server.start().http
        progress(0.9, "checking")
        self.tool_template, self.reasoning = self._template_facts()
        self._measured = self._measure()
        self._slots = [Slot(i) for i in range(self.slots)]
        self.lost = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"llama.cpp-{self.spec.key}",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(10)
        progress(1.0, "ready")

    def _template_facts(self) -> tuple[bool, Reasoning]:
        """Whether the chat template renders tools, and what it says about thinking."""
        props = self._http.get("/props")
        if props.status_code != 200:
            return False, Reasoning()
        props = props.json()
        reasoning = Reasoning.of_template(props.get("chat_template"))
        caps = props.get("chat_template_caps") or {}
        if "supports_tools" in caps:
            return bool(caps["supports_tools"]), reasoning
        return chat_format.knows_tools(props.get("chat_template")), reasoning

    def _measure(self) -> int:
        """The server's resident memory once loaded (weights mapped, KV and compute buffers
        allocated); counted against the budget if above the estimate."""
        return self.resident_bytes() or 0

    async def _open(self) -> None:
        self._monitor = asyncio.ensure_future(self._watch())

    def unload(self) -> None:
        if self._loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            except Exception:
                log.exception("model %s: closing the llama.cpp client failed", self.spec.key)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread:
                self._thread.join(10)
            self._loop = None
        self._http = None
        if self._server is not None:
            self._server.stop()
        if self._template_file:
            Path(self._template_file).unlink(missing_ok=True)
            self._template_file = None

    async def _close(self) -> None:
        self._monitor.cancel()
        error = ServiceUnavailableError(f"model '{self.spec.key}' is unloading", retry_after=1.0)
        self._fail_everything(error)

    def alive(self) -> bool:
        return self.lost is None

    async def _watch(self) -> None:
        """Notice a server that died on its own: every request ends with an error at once."""
        while True:
            await asyncio.sleep(0.2)
            code = self._server.exited() if self._server is not None else None
            if code is not None and self.lost is None:
                self.lost = f"llama.cpp stopped (exit code {code})"
                self._server.log_tail("stopped")
                log.warning("model %s: %s; it loads again on the next request", self.spec.key, self.lost)
                self._fail_everything(ServiceUnavailableError(
                    f"model '{self.spec.key}': {self.lost}; it loads again on the next request",
                    retry_after=1.0, code="engine_stopped"))

    def _fail_everything(self, error: ShoalError) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            self._end(waiter.handle, error=error)
        for task in list(self._running.values()):
            task.cancel()  # _generate ends its handle: engine lost, or unloading

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, request: GenerationRequest, with_pieces: bool = False) -> list:
        """The prompt's token ids (with `with_pieces`, llama-server's {"id", "piece"} objects)."""
        if self._http is None:
            raise ModelLoadError(f"model '{self.spec.key}' is not loaded")
        if request.messages is not None:
            if self.spec.kind != "chat":
                raise InvalidRequestError(
                    f"model '{self.spec.name}' is a completion model (a base model with no chat "
                    "template): send a prompt to /v1/completions instead of messages",
                    param="model", code="not_a_chat_model")
            if not request.messages:
                raise InvalidParamsError("messages must not be empty", param="messages")
            messages, tools = chat_format.render(request, self.tool_template, object_arguments=False)
            switches = self.reasoning.template_kwargs(request.thinking)
            templated = self._post("/apply-template", {
                "messages": messages, **({"tools": tools} if tools else {}),
                "add_generation_prompt": request.add_generation_prompt,
                **({"chat_template_kwargs": switches} if switches else {}),
                **({"continue_final_message": True} if request.continue_final_message else {})})
            request.thoughts = self.reasoning.marks(templated["prompt"])
            return self._post("/tokenize", {"content": templated["prompt"], "add_special": False,
                                            "parse_special": True, "with_pieces": with_pieces})["tokens"]
        if not request.prompt:
            raise InvalidParamsError("prompt must not be empty", param="prompt")
        return self._post("/tokenize", {"content": request.prompt, "add_special": True,
                                        "parse_special": True, "with_pieces": with_pieces})["tokens"]

    def tokenize(self, request: GenerationRequest) -> list[int]:
        return self.prompt_ids(request)

    def tokenize_pieces(self, request: GenerationRequest) -> list[tuple[int, bytes]]:
        """llama-server's pieces: text, or a list of byte values where a piece is not UTF-8."""
        return [(t["id"], bytes(t["piece"]) if isinstance(t["piece"], list) else t["piece"].encode())
                for t in self.prompt_ids(request, with_pieces=True)]

    def detokenize(self, ids: list[int]) -> str:
        check_token_ids(ids, self._facts.get("vocab") or 0)
        return self._post("/detokenize", {"tokens": ids})["content"]

    def _post(self, path: str, body: dict) -> dict:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._engine_error(exc) from exc
        if response.status_code != 200:
            raise InvalidRequestError(f"llama.cpp refused the prompt ({response.status_code}): "
                                      f"{error_message(response.text)}")
        return response.json()

    def _engine_error(self, exc: BaseException) -> ShoalError:
        code = self._server.exited() if self._server is not None else None
        if code is not None:
            self.lost = self.lost or f"llama.cpp stopped (exit code {code})"
            return ServiceUnavailableError(f"model '{self.spec.key}': {self.lost}; it loads again on the "
                                           "next request", retry_after=1.0, code="engine_stopped")
        return ServiceUnavailableError(f"model '{self.spec.key}': llama.cpp did not answer "
                                       f"({type(exc).__name__})", retry_after=1.0)

    def count_tokens(self, text: str) -> int:
        if self._http is None or self.lost:
            return super().count_tokens(text)
        try:
            return len(self._post("/tokenize", {"content": text, "add_special": False})["tokens"])
        except ShoalError:
            return super().count_tokens(text)

    # ------------------------------------------------------------------ requests
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        if self.lost:
            raise ServiceUnavailableError(f"model '{self.spec.key}': {self.lost}; it loads again on the "
                                          "next request", retry_after=1.0, code="engine_stopped")
        if self._loop is None:
            raise ModelLoadError(f"model '{self.spec.key}' is not loaded")
        fmt = request.output_format
        if fmt is not None and fmt.kind == "regex":
            raise InvalidRequestError(f"{fmt.param}: a regular expression is enforced on the transformers engine "
                                      f"only; '{self.spec.key}' runs on llama.cpp (ask for a transformers "
                                      "version, or a JSON schema)", param=fmt.param)
        if fmt is not None:
            fmt.check()
        check_logit_bias(request.params, self._facts.get("vocab") or 0)
        ids = self.prompt_ids(request)
        limit = self._ctx_slot
        wanted = request.params.max_new_tokens
        if wanted is None:
            if len(ids) >= limit:
                raise ContextOverflowError(len(ids), 1, limit)
            wanted = min(DEFAULT_MAX_NEW_TOKENS, limit - len(ids))
        elif len(ids) + wanted > limit:
            raise ContextOverflowError(len(ids), wanted, limit)
        with self._lock:
            capacity = self.slots + self.context.engine.queue_size
            if self._active >= capacity:
                raise QueueFullError(self.spec.key, max(0, self._active - self.slots), 1.0)
            self._active += 1
        handle = GenerationHandle(request, model=self.spec.key)
        waiter = Waiter(handle, list(ids), wanted, time.monotonic())
        asyncio.run_coroutine_threadsafe(self._enqueue(waiter), self._loop)
        return handle

    def _end(self, handle: GenerationHandle, *, final: Finished | None = None,
             error: ShoalError | None = None) -> None:
        """Every accepted request ends here exactly once (counted out of the queue limit)."""
        if handle.done:
            return
        with self._lock:
            self._active -= 1
        if error is not None:
            handle.fail(error)
        else:
            handle.push(final)

    async def _enqueue(self, waiter: Waiter) -> None:
        if self.lost:
            self._end(waiter.handle, error=ServiceUnavailableError(
                f"model '{self.spec.key}': {self.lost}", retry_after=1.0, code="engine_stopped"))
            return
        self._queue.append(waiter)
        self._dispatch()
        if waiter in self._queue:
            timeout = waiter.handle.request.queue_timeout or self.context.engine.queue_timeout
            asyncio.get_running_loop().call_later(timeout, self._expire, waiter)
            asyncio.ensure_future(self._watch_cancel_queued(waiter))

    def _expire(self, waiter: Waiter) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)
            self._end(waiter.handle, error=QueueTimeoutError(self.spec.key, time.monotonic() - waiter.submitted))

    async def _watch_cancel_queued(self, waiter: Waiter) -> None:
        while waiter in self._queue:
            if waiter.handle.cancelled:
                self._queue.remove(waiter)
                self._finish_cancelled(waiter, "", 0, 0, time.monotonic())
                return
            await asyncio.sleep(0.05)

    def _dispatch(self) -> None:
        while self._queue:
            free = [slot for slot in self._slots if not slot.busy]
            if not free:
                return
            waiter = self._queue.popleft()
            slot, reuse = pick_slot(free, waiter, self._batch, busy=[s.id for s in self._slots if s.busy])
            slot.busy = True
            self.stats["peak_running"] = max(self.stats["peak_running"], sum(s.busy for s in self._slots))
            task = asyncio.ensure_future(self._generate(waiter, slot, reuse))
            self._running[id(task)] = task

    async def _generate(self, waiter: Waiter, slot: Slot, reuse: bool) -> None:
        handle = waiter.handle
        started = time.monotonic()
        restored, reuse = await self._restore(waiter, slot, reuse)
        known = max(restored, common_prefix(slot.tokens, waiter.ids) if reuse else 0)  # already in the slot's KV
        slot.scope, slot.tokens, slot.used = handle.request.cache_scope, list(waiter.ids), started
        body = completion_body(handle.request, waiter.ids, waiter.wanted, slot.id, reuse, self._ctx_slot)
        text, produced, final, ended = "", 0, None, False
        pieced = False
        forget_cancel = handle.on_cancel(_canceller(asyncio.get_running_loop(), asyncio.current_task()))
        try:
            if self.read_in_pieces and len(waiter.ids) - known > 2 * self._piece and \
                    any(s.busy for s in self._slots if s is not slot):
                await self._read_in_pieces(slot, waiter.ids, known, reuse)
                body["cache_prompt"] = pieced = True
            events = self._completion_events(body)
            try:
                async for event in events:
                    piece, ids = event.get("content") or "", tuple(event.get("tokens") or ())
                    if ids or piece:
                        slot.tokens.extend(ids)
                        produced += len(ids)
                        text += piece
                        handle.push(delta_of(piece, ids, event.get("completion_probabilities") or [],
                                           handle.request.top_logprobs))
                    if event.get("stop"):
                        final = event
                        break
            finally:
                await events.aclose()
            ended = True
        except asyncio.CancelledError:
            if self.lost:
                self._end(handle, error=self._lost_error())
            elif handle.cancelled:
                slot.tokens = []  # the server stopped mid-sequence: do not trust its KV for reuse
                self._finish_cancelled(waiter, text, produced, 0, started)
            else:
                self._end(handle, error=ServiceUnavailableError(f"model '{self.spec.key}' is unloading",
                                                                retry_after=1.0))
            return
        except ShoalError as exc:
            slot.tokens = []
            self._end(handle, error=exc)
            return
        except UpstreamRefused as exc:
            slot.tokens = []
            self._end(handle, error=InvalidRequestError(
                f"llama.cpp refused the request ({exc.status}): {error_message(exc.text)}"))
            return
        except Exception as exc:  # no await in here: a cancel now would skip ending the handle
            slot.tokens = []
            process = self._server.process if self._server is not None else None
            if process is not None:
                try:  # a dead server shows in poll() a moment after its socket closes
                    process.wait(0.3)
                except subprocess.TimeoutExpired:
                    pass
            self._end(handle, error=self._engine_error(exc))
            return
        finally:
            forget_cancel()
            self._running.pop(id(asyncio.current_task()), None)
            saving = ended and final is not None and self._saves(handle.request, slot)
            if not saving:
                self._release(slot)
        if final is None:
            self._end(handle, error=ServiceUnavailableError(
                f"model '{self.spec.key}': llama.cpp ended the stream early", retry_after=1.0))
            return
        stop_type = final.get("stop_type")
        reason = "length" if stop_type == "limit" else "stop"
        stopped_by = {"eos": "eos", "word": "stop_sequence"}.get(stop_type)
        timings = final.get("timings") or {}
        cached = int(timings.get("cache_n") or 0)
        if pieced:  # what the pieces read was computed for this request, not found in a cache
            cached = min(cached, known)
        self.stats["requests"] += 1
        self.stats["cache_reused_tokens"] += cached
        now = time.monotonic()
        ttft = handle.first_token_at - handle.created if handle.first_token_at else None
        # the EOS the model produced counts as a completion token, as on the transformers engine
        # (llama.cpp may take the EOS as one past n_predict; a caller never sees more than it asked for)
        usage = Usage(len(waiter.ids), min(produced + (1 if stop_type == "eos" else 0), waiter.wanted), cached,
                      min(restored, cached))
        if saving:
            self._kv.disk.expect()
        self._end(handle, final=Finished(reason, usage, text, self.spec.key, ttft, now - handle.created,
                                         started - waiter.submitted, stopped_by,
                                         final.get("stopping_word") or None if stopped_by == "stop_sequence" else None))
        if saving:  # the reply has ended: the slot is written to disk, then given to the next request
            asyncio.ensure_future(self._save(slot, handle.request))

    def _release(self, slot: Slot) -> None:
        slot.busy = False
        slot.used = time.monotonic()
        if self._loop is not None and not self.lost:
            self._dispatch()

    # ------------------------------------------------------------------ chats' KV on disk
    def _saves(self, request: GenerationRequest, slot: Slot) -> bool:
        return self._kv is not None and not self.lost and self._kv.wants(request.cache_scope, request.cache_key,
                                                                         len(slot.tokens))

    async def _restore(self, waiter: Waiter, slot: Slot, reuse: bool) -> tuple[int, bool]:
        """Before a chat's turn: when the disk holds a longer prefix of this chat and owner than
        the slot does (by more than RESTORE_MIN_TOKENS), read it into the slot. (tokens restored,
        whether the slot's KV may be reused)."""
        request = waiter.handle.request
        found = self._kv.find(request.cache_scope, request.cache_key, waiter.ids) if self._kv is not None else None
        had = common_prefix(slot.tokens, waiter.ids) if reuse else 0
        if found is None:
            if self._kv is not None and had <= RESTORE_MIN_TOKENS and \
                    self._kv.wants(request.cache_scope, request.cache_key, len(waiter.ids)):
                self._kv.disk.miss()
            return 0, reuse
        entry, length = found
        if length <= had + RESTORE_MIN_TOKENS:
            return 0, reuse
        began = time.monotonic()
        ok = await asyncio.to_thread(self._restore_now, slot.id, entry)
        if not ok:  # the server cleared the slot: its prompt is read as usual
            slot.tokens = []
            return 0, False
        self._kv.disk.used(entry, length, time.monotonic() - began)
        return length, True

    def _restore_now(self, slot_id: int, entry) -> bool:
        if not self._kv.disk.check(entry):
            return False
        try:
            response = self._http.post(f"/slots/{slot_id}", params={"action": "restore"},
                                       json={"filename": entry.file}, timeout=60)
        except (httpx.HTTPError, AttributeError):  # AttributeError: unloaded meanwhile
            return False
        if response.status_code != 200:
            log.warning("model %s: llama.cpp could not restore %s: %s", self.spec.key, entry.file,
                        error_message(response.text))
            return False
        return True

    async def _save(self, slot: Slot, request: GenerationRequest) -> None:
        try:
            await self._save_slot(slot, request)
        finally:
            self._kv.disk.settle()

    async def _save_slot(self, slot: Slot, request: GenerationRequest) -> None:
        tokens, name = list(slot.tokens), self._kv.new_file(".bin")
        try:
            response = await asyncio.to_thread(self._http.post, f"/slots/{slot.id}", params={"action": "save"},
                                               json={"filename": name}, timeout=60)
        except Exception:  # unloaded or stopped meanwhile: nothing saved
            response = None
        finally:
            self._release(slot)
        if response is None or response.status_code != 200:
            (self._kv.folder / name).unlink(missing_ok=True)
            return
        saved = int(response.json().get("n_saved") or 0)
        if not 0 < saved <= len(tokens):  # not the tokens Shoal knows of: never restored
            (self._kv.folder / name).unlink(missing_ok=True)
            return
        self._kv.disk.write_later(self._kv.add, request.cache_scope, request.cache_key, tokens[:saved], name)

    def _lost_error(self) -> ShoalError:
        return ServiceUnavailableError(f"model '{self.spec.key}': {self.lost or 'llama.cpp stopped'}; it "
                                       "loads again on the next request", retry_after=1.0, code="engine_stopped")

    async def _read_in_pieces(self, slot: Slot, ids: list[int], start: int, reuse: bool) -> None:
        """A long prompt arriving beside running streams is read `PIECE_TOKENS` per step: left to
        itself llama-server puts a whole `-b` batch of it into each step, and every running stream
        waits for that step (at 6k tokens of context here, 256 prompt tokens take ~1.3 s). The
        pieces are requests on the prompt's slot that end after their prompt (`n_predict` 0), two
        in flight: llama-server keeps the second waiting for the slot and starts it at the next
        step. The request itself then reads the rest. A first piece that clears another caller's
        KV (`reuse` false) goes alone, so no later piece can reuse what it held."""
        size = self._piece
        in_flight: list[asyncio.Future] = []
        try:
            for n, end in enumerate(range(start + size, len(ids), size)):
                body = prompt_piece_body(ids[:end], slot.id, cache_prompt=reuse or n > 0)
                in_flight.append(asyncio.ensure_future(self._read_piece(body)))
                if len(in_flight) == 2 or (n == 0 and not reuse):
                    await in_flight.pop(0)
            while in_flight:
                await in_flight.pop(0)
        finally:
            for future in in_flight:
                future.cancel()

    async def _read_piece(self, body: dict) -> None:
        events = self._completion_events(body)
        try:
            async for event in events:
                if event.get("stop"):
                    return
        finally:
            await events.aclose()
        raise ConnectionResetError("llama.cpp ended a prompt piece early")

    async def _completion_events(self, body: dict):
        """llama-server's streamed `/completion` as events; an error event raises. Closing this
        closes the connection, which stops the sequence upstream."""
        lines = stream_lines("127.0.0.1", self._server.port, "/completion", self._server.headers, body)
        try:
            async for line in lines:
                event = json.loads(line.split(":", 1)[1])
                if "error" in event or line.startswith("error:"):
                    raise InvalidRequestError(f"llama.cpp: {error_message(json.dumps(event))}")
                yield event
        finally:
            await lines.aclose()

    def _finish_cancelled(self, waiter: Waiter, text: str, produced: int, cached: int, started: float) -> None:
        handle = waiter.handle
        now = time.monotonic()
        ttft = handle.first_token_at - handle.created if handle.first_token_at else None
        self._end(handle, final=Finished("cancelled", Usage(len(waiter.ids), produced, cached), text,
                                         self.spec.key, ttft, now - handle.created, started - waiter.submitted))

    # ------------------------------------------------------------------ status
    @property
    def context_length(self) -> int:
        return self._ctx_slot or self.spec.context_length or 2048

    def memory_bytes(self) -> int:
        return max(self._measured, self.estimate_bytes())

    def resident_bytes(self) -> int | None:
        return self._server.resident_bytes() if self._server is not None else None

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine_name, "device": "cpu", "dtype": "gguf",
                "parameters": self._facts.get("parameters"), "context_length": self.context_length,
                "slots": self.slots, "kv_tokens": self._ctx_total,
                "kv_layout": "per-slot" if self._split else "unified",
                "kv_cache_bytes": self._ctx_total * self._bytes_per_token() if self._facts else None,
                "resident_at_load_bytes": self._measured or None, "threads": self._threads,
                "gguf": self._gguf.name if self._gguf else None}

    def load_stats(self) -> dict[str, Any]:
        busy = sum(1 for s in self._slots if s.busy)
        return {"running": busy, "waiting": len(self._queue), "resident_bytes": self.resident_bytes(),
                "lost": self.lost, **self.stats}


__all__ = ["LlamaCppBackend", "gguf_facts"]


def _canceller(loop: asyncio.AbstractEventLoop, task: asyncio.Task):
    """What a cancelled handle calls (from any thread): the request's task is cancelled on its
    loop, which closes its connection to the server, which stops the sequence."""
    def cancel() -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the request ended with it
            loop.call_soon_threadsafe(task.cancel)
    return cancel
