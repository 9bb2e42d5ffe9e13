"""Continuous batching for one local transformers model.

Every concurrent request of a model goes through its `BatchEngine`: requests wait in a bounded
FIFO queue, join the running batch as soon as a slot and KV-cache room are free, and leave it the
moment they finish or are cancelled. Each decode step runs one forward pass for the whole batch
over a shared, left-padded KV cache; each row samples with its own parameters and seed and stops
on its own EOS, stop sequences and token limit. Finished rows leave their KV behind in a
`PrefixCache`, so a later prompt that starts the same way (the next turn of a chat) only prefills
what is new.

The engine owns the model's forward passes and nothing else: it receives token ids, not
messages; it knows no HTTP, no sessions, no pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from . import faults
from .config import EngineConfig
from .constraints import TokenConstraint
from .detok import TextAssembler
from .errors import (
    ContextOverflowError,
    GenerationError,
    InvalidParamsError,
    QueueFullError,
    QueueTimeoutError,
    ServiceUnavailableError,
    ShoalError,
)
from .kv import ATTENTION, KV, RowKV, Segment, cache_from, layers, pad_left, register_ragged_attention
from .params import GenerationParams
from .prefix_cache import PrefixCache
from .sampling import RowSampler, choose_tokens
from .stream import Finished, GenerationHandle, TextDelta, Usage

log = logging.getLogger("shoal.engine")


@dataclass(eq=False)
class _Job:
    handle: GenerationHandle
    prompt_ids: list[int]
    max_new: int
    sampler: RowSampler
    assembler: TextAssembler
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0
    generated: list[int] = field(default_factory=list)
    next_token: int = 0
    position: int = 0  # position id of next_token
    cached: int = 0  # prompt tokens served from the prefix cache
    restored: int = 0  # of those, read from disk (kv_disk)
    unreported: list[int] = field(default_factory=list)  # tokens not yet covered by a TextDelta
    unreported_logprobs: list[float] = field(default_factory=list)
    unreported_top: list[list[tuple[int, float]]] = field(default_factory=list)
    holds_slot: bool = False  # admitted: counted in the engine's _active until released
    finished: bool = False  # its handle got its last event from the engine

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.generated)


class BatchEngine:
    """The scheduler, over the padded layout: one left-padded KV buffer shared by the batch.
    `RaggedEngine` runs the same scheduler over per-request KV."""

    layout = "padded"

    def __init__(self, model: torch.nn.Module, decode: Callable[[Sequence[int]], str], *,
                 name: str, eos_ids: set[int], context_length: int, config: EngineConfig,
                 token_bytes: Callable[[int], bytes] | None = None):
        self.model = model
        self.name = name
        self._decode = decode
        self._token_bytes = token_bytes  # one token's bytes, for callers who read logprobs
        self._eos = eos_ids
        self.context_length = context_length
        self.config = config
        self.device = next(model.parameters()).device
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._rows: list[_Job] = []
        self._active = 0  # jobs holding a slot: taken from the queue and not finished
        self._owned: dict[int, _Job] = {}  # those jobs: whatever happens, each one is finished or failed
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, seq] 1 = real token, 0 = padding
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.bytes_per_token = self._measure_bytes_per_token()
        prefix_bytes = int(config.kv_cache_bytes * config.prefix_cache_share)
        self.prefix_cache = PrefixCache(prefix_bytes, self.bytes_per_token)
        self.batch_kv_bytes = config.kv_cache_bytes - prefix_bytes
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "peak_kv_bytes": 0, "peak_batch": 0,
                      "prefix_hits": 0, "prefix_tokens_saved": 0}
        self._durations: deque[float] = deque(maxlen=32)

    # ---------------------------------------------------------------- public API (any thread)
    @property
    def max_request_tokens(self) -> int:
        """Longest prompt + new tokens one request may have: the context, or what the KV budget
        holds for one request alone (with the one spare position the batch buffers reserve), so
        every request admitted to the queue can run."""
        return min(self.context_length, self.batch_kv_bytes // self.bytes_per_token - 1)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let queued and running requests finish (up to `timeout`), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)
        with self._cond:
            left = list(self._waiting) + list(self._owned.values())
            self._waiting.clear()
        for job in left:
            self._end(job, failure=ServiceUnavailableError(f"model '{self.name}' was unloaded"))
        if self._thread and self._thread.is_alive():  # a step still runs: it frees its buffers on exit
            log.warning("engine %s: still busy %.0f s after stop; its buffers go when it ends", self.name, timeout)
            return
        self._cache = self._mask = None
        self.prefix_cache.clear()

    def submit(self, handle: GenerationHandle, prompt_ids: list[int], params: GenerationParams,
               max_new_tokens: int, constraint: TokenConstraint | None = None, top_n: int = 0) -> None:
        if not prompt_ids:
            raise InvalidParamsError("the prompt is empty once tokenized", param="prompt")
        if len(prompt_ids) + max_new_tokens > self.max_request_tokens:
            raise ContextOverflowError(len(prompt_ids), max_new_tokens, self.max_request_tokens)
        job = _Job(handle, list(prompt_ids), max_new_tokens,
                   RowSampler(params, prompt_ids, self.device, constraint, top_n),
                   TextAssembler(self._decode, params.stop))
        with self._cond:
            if self._stopping:
                raise ServiceUnavailableError(f"model '{self.name}' is unloading", retry_after=1.0)
            capacity = self.config.max_batch_size + self.config.queue_size
            if self._active + len(self._waiting) >= capacity:
                raise QueueFullError(self.name, len(self._waiting), self._retry_after())
            self._waiting.append(job)
            self._cond.notify_all()

    def load(self) -> dict:
        """Queue depth, batch size and KV use, for status and metrics."""
        with self._cond:
            rows, waiting = len(self._rows), len(self._waiting)
        return {"running": rows, "waiting": waiting, "kv_bytes": self._kv_bytes(),
                "kv_cap_bytes": self.config.kv_cache_bytes, "prefix_bytes": self.prefix_cache.bytes,
                **self.stats}

    def _retry_after(self) -> float:
        mean = sum(self._durations) / len(self._durations) if self._durations else 2.0
        return float(max(1, min(60, round(mean))))

    # ---------------------------------------------------------------- the engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._rows and not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._rows and not self._waiting:
                    self._cache = self._mask = None
                    return
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    admitted = self._admit()
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._step()
                    elif not admitted:
                        with self._cond:  # everything waiting is blocked: wait for a change
                            self._cond.wait(0.05)
            except Exception as exc:  # a failed forward must not kill the engine, nor hang a client
                log.exception("engine %s: generation failed", self.name)
                self._fail_all(GenerationError(f"generation failed in model '{self.name}': {exc}"))

    def _fail_all(self, error: ShoalError) -> None:
        """After an error anywhere in a step: every job the engine holds ends with the error
        (each slot released once), the batch starts empty, the queue goes on."""
        with self._cond:
            self._rows = []
            jobs = list(self._owned.values())
        self._cache = self._mask = None
        for job in jobs:
            self._end(job, failure=error)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        expired: list[_Job] = []
        with self._cond:
            keep: deque[_Job] = deque()
            for job in self._waiting:
                timeout = job.handle.request.queue_timeout or self.config.queue_timeout
                if job.handle.cancelled or now - job.submitted > timeout:
                    expired.append(job)
                else:
                    keep.append(job)
            self._waiting = keep
        for job in expired:
            if job.handle.cancelled:
                self._finish(job, "cancelled")
            else:
                self._end(job, failure=QueueTimeoutError(self.name, now - job.submitted))
        gone = [i for i, job in enumerate(self._rows) if job.handle.cancelled or job.finished]
        self._remove_rows(gone, dict.fromkeys(gone, "cancelled"))

    def _admit(self) -> list[_Job]:
        """Take waiting jobs, in order, while a slot and KV room are free. A job that does not fit
        yet lets later (smaller) ones pass for `bypass_seconds`; after that nobody passes it, so
        it runs as soon as the room it needs is free."""
        admitted: list[_Job] = []
        now = time.monotonic()
        with self._cond:
            i = 0
            while i < len(self._waiting) and self._active + len(admitted) < self.config.max_batch_size:
                job = self._waiting[i]
                if not self._fits(admitted + [job]):
                    if now - job.submitted > self.config.bypass_seconds:
                        break
                    i += 1
                    continue
                del self._waiting[i]
                job.holds_slot = True
                self._owned[id(job)] = job
                admitted.append(job)
            self._active += len(admitted)
        return admitted

    def _fits(self, newcomers: list[_Job]) -> bool:
        """Would the batch's KV cache stay within its budget until every row is done?"""
        seq = self._mask.shape[1] if self._mask is not None else 0
        jobs = self._rows + newcomers
        longest = max([seq] + [len(j.prompt_ids) for j in newcomers])
        horizon = longest + max(j.remaining for j in jobs) + 1  # as _capacity() will allocate
        return len(jobs) * horizon * self.bytes_per_token <= self.batch_kv_bytes

    # ---------------------------------------------------------------- prefill
    def _prefill(self, jobs: list[_Job]) -> None:
        fresh: list[_Job] = []
        for job in jobs:
            job.started = time.monotonic()
            hit = self._lookup(job)
            if hit is None:
                fresh.append(job)
                continue
            length, kv, job.restored = hit
            job.cached = length
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens_saved"] += length
            self._prefill_group([job], kv, length)
        if fresh:
            self._prefill_group(fresh, None, 0)

    def _lookup(self, job: _Job) -> tuple[int, KV, int] | None:
        request = job.handle.request
        return self.prefix_cache.lookup(request.cache_scope, job.prompt_ids, self.config.min_prefix_tokens,
                                        chat=request.cache_key, device=self.device)

    def _prefill_group(self, jobs: list[_Job], past: KV | None, past_len: int) -> None:
        faults.check("engine.prefill")
        self.stats["prefills"] += 1
        suffixes = [job.prompt_ids[past_len:] for job in jobs]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(jobs), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(jobs), past_len + width), dtype=torch.long)
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix):] = torch.tensor(suffix)
            mask[i, past_len + width - len(suffix):] = 1
        mask[:, :past_len] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        cache = cache_from(past, past_len + width + 1) if past is not None else DynamicCache()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        firsts, logprobs, tops = choose_tokens(out.logits[:, -1, :].float(), [job.sampler for job in jobs])
        keep, finished = [], []
        for i, (job, token, logprob) in enumerate(zip(jobs, firsts, logprobs)):
            job.position = len(job.prompt_ids)
            reason = self._accept(job, token, logprob, tops[i])
            if reason:
                finished.append((job, reason))
            else:
                keep.append(i)
        if keep:
            kv = [(k[keep], v[keep]) for k, v in layers(out.past_key_values)]
            self._merge(kv, mask[keep], [jobs[i] for i in keep])
        for job, reason in finished:
            self._finish(job, reason)

    def _pad_id(self) -> int:
        return next(iter(self._eos), 0)

    # ---------------------------------------------------------------- decode
    def _step(self) -> None:
        faults.check("engine.step")
        rows = self._rows
        ids = torch.tensor([[job.next_token] for job in rows], device=self.device)
        positions = torch.tensor([[job.position] for job in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask.to(self.device), position_ids=positions,
                         past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self._mask = mask
        self.stats["steps"] += 1
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self._kv_bytes())
        tokens, logprobs, tops = choose_tokens(out.logits[:, -1, :].float(), [job.sampler for job in rows])
        done = {}
        for i, (job, token, logprob) in enumerate(zip(rows, tokens, logprobs)):
            job.position += 1
            reason = self._accept(job, token, logprob, tops[i])
            if reason:
                done[i] = reason
        self._remove_rows(list(done), done)

    def _accept(self, job: _Job, token: int, logprob: float, top: list[tuple[int, float]]) -> str | None:
        """Record a sampled token and emit its text; return the finish reason, if finished.
        (The caller finishes the job after the batch is updated, so a client that sees the end
        sees an engine that is already done with the row.)"""
        job.generated.append(token)
        job.sampler.observe(token)
        job.unreported.append(token)
        job.unreported_logprobs.append(logprob)
        job.unreported_top.append(top)
        self.stats["tokens"] += 1
        if token in self._eos:
            return "stop"
        delta = job.assembler.add(token)
        if delta:
            self._emit(job, delta)
        if job.assembler.stopped:
            return "stop"
        if job.remaining <= 0 or job.position + 1 >= self.context_length:
            return "length"
        job.next_token = token
        return None

    def _emit(self, job: _Job, text: str) -> None:
        pieces: tuple[bytes, ...] = ()
        top: tuple[tuple[tuple[bytes, float], ...], ...] = ()
        if job.handle.request.want_logprobs and self._token_bytes is not None:
            piece = self._token_bytes
            pieces = tuple(piece(t) for t in job.unreported)
            if job.sampler.top_n:
                top = tuple(tuple((piece(t), lp) for t, lp in alternatives) for alternatives in job.unreported_top)
        job.handle.push(TextDelta(text, tuple(job.unreported), tuple(job.unreported_logprobs), pieces, top))
        job.unreported, job.unreported_logprobs, job.unreported_top = [], [], []

    def _end(self, job: _Job, failure: ShoalError | None = None) -> bool:
        """Mark a job done once: release its slot, forget it. False if it was already done."""
        with self._cond:
            if job.finished:
                return False
            job.finished = True
            self._owned.pop(id(job), None)
            if job.holds_slot:
                job.holds_slot = False
                self._active -= 1
        if failure is not None:
            job.handle.fail(failure)
        return True

    def _finish(self, job: _Job, reason: str) -> None:
        if not self._end(job):
            return
        try:
            tail = job.assembler.flush()
            if tail:
                self._emit(job, tail)
        except Exception:  # the text so far still ends the stream
            log.exception("engine %s: flushing the last text failed", self.name)
        now = time.monotonic()
        handle = job.handle
        ttft = handle.first_token_at - handle.created if handle.first_token_at else None
        self._durations.append(now - job.submitted)
        usage = Usage(len(job.prompt_ids), len(job.generated), job.cached, job.restored)
        stopped_by = None
        if reason == "stop":
            stopped_by = "stop_sequence" if job.assembler.stopped else "eos"
        handle.push(Finished(reason, usage, job.assembler.text, self.name, ttft,
                             now - handle.created, (job.started or now) - job.submitted, stopped_by,
                             job.assembler.matched))

    # ---------------------------------------------------------------- the batch's KV cache
    def _capacity(self, length: int, jobs: list[_Job]) -> int:
        """Positions the batch's buffers need until every row is done (what `_fits` reserved)."""
        return length + max((j.remaining for j in jobs), default=0) + 1

    def _merge(self, kv: KV, mask: torch.Tensor, jobs: list[_Job]) -> None:
        if self._cache is None or not self._rows:
            self._cache, self._mask = cache_from(kv, self._capacity(mask.shape[1], jobs)), mask
        else:
            have, new = self._mask.shape[1], mask.shape[1]
            old = layers(self._cache)
            if new < have:
                kv, mask = pad_left(kv, have - new), F.pad(mask, (have - new, 0))
            elif new > have:
                old, self._mask = pad_left(old, new - have), F.pad(self._mask, (new - have, 0))
            merged = [(torch.cat([k0, k1]), torch.cat([v0, v1])) for (k0, v0), (k1, v1) in zip(old, kv)]
            self._mask = torch.cat([self._mask, mask])
            self._cache = cache_from(merged, self._capacity(self._mask.shape[1], self._rows + jobs))
        self._rows.extend(jobs)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._rows))

    def _remove_rows(self, indices: list[int], reasons: dict[int, str]) -> None:
        """Take rows out of the batch (keeping their KV as a prefix), then finish their jobs."""
        if not indices:
            return
        leaving = [self._rows[i] for i in indices]
        for i in indices:
            self._remember_prefix(i)
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        rows = [self._rows[i] for i in keep]
        faults.check("engine.remove_rows")
        cache = mask = None
        if keep:  # built before anything changes: if this fails, _fail_all ends every job
            mask = self._mask[keep]
            first = int((mask.sum(0) > 0).nonzero()[0])  # drop columns of padding in every row
            mask = mask[:, first:]
            cache = cache_from([(k[keep, :, first:], v[keep, :, first:]) for k, v in layers(self._cache)],
                                self._capacity(mask.shape[1], rows))
        with self._cond:
            self._rows = rows
        self._cache, self._mask = cache, mask
        for index, job in zip(indices, leaving):
            self._finish(job, reasons[index])

    def _remember_prefix(self, row: int) -> None:
        job = self._rows[row]
        if job.handle.cancelled or self._cache is None or not self.prefix_cache.keeps:
            return
        real = self._mask[row].bool()
        ids = (job.prompt_ids + job.generated)[: int(real.sum())]
        if len(ids) < self.config.min_prefix_tokens:
            return
        self.prefix_cache.store(job.handle.request.cache_scope, ids,
                                [(k[row:row + 1, :, real], v[row:row + 1, :, real])
                                 for k, v in layers(self._cache)], chat=job.handle.request.cache_key)

    @property
    def holds_kv(self) -> bool:
        """Whether the running batch's KV buffers are allocated."""
        return self._cache is not None

    def _kv_bytes(self) -> int:
        cache = self._cache
        if cache is None:
            return 0
        return sum(getattr(layer, "reserved_bytes", 0) for layer in cache.layers)

    def _measure_bytes_per_token(self) -> int:
        with torch.inference_mode():
            cache = DynamicCache()
            self.model(input_ids=torch.tensor([[self._pad_id()]], device=self.device),
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
            return max(1, sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                              for k, v in layers(cache)))


class RaggedEngine(BatchEngine):
    """The same scheduler over the ragged layout (`kv.RowKV`, `kv.ragged_attention`): each row
    keeps its own KV and reserves only its own prompt + token limit, so one long prompt does not
    shrink everyone's batch; joining and leaving copy nothing; a prompt is prefilled
    `prefill_chunk` tokens per step inside the running batch's forward pass, so the streams
    already running keep getting tokens while it is read."""

    layout = "ragged"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        probe = DynamicCache()
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([[self._pad_id()]], device=self.device),
                       past_key_values=probe, use_cache=True, logits_to_keep=1)
        shapes = {(k.shape[1], k.shape[3], k.dtype) for k, _ in layers(probe)}
        if len(shapes) != 1:
            raise NotImplementedError("layers with different KV shapes")
        (heads, dim, self._kv_dtype), = shapes
        self._kv_shape = (len(probe.layers), heads, dim)
        register_ragged_attention()
        self.model.set_attn_implementation(ATTENTION)
        self._kv: dict[int, RowKV] = {}  # id(job) -> its KV, for jobs in the batch
        self._scratch = RowKV(self._kv_shape, 1, self._kv_dtype, self.device)
        self._fed: dict[int, int] = {}  # id(job) -> prompt tokens in its KV so far

    def _fits(self, newcomers: list[_Job]) -> bool:
        reserved = sum(kv.capacity for kv in self._kv.values())
        wanted = sum(len(j.prompt_ids) + j.max_new + 1 for j in newcomers)
        return (reserved + wanted) * self.bytes_per_token <= self.batch_kv_bytes

    def _prefill(self, jobs: list[_Job]) -> None:
        """Give each admitted job its KV (from a cached prefix if its scope has one); the
        prompt is read by the following steps."""
        for job in jobs:
            job.started = time.monotonic()
            kv = RowKV(self._kv_shape, len(job.prompt_ids) + job.max_new + 1, self._kv_dtype, self.device)
            hit = self._lookup(job)
            if hit is not None:
                length, prefix, job.restored = hit
                kv.load(prefix)
                job.cached = length
                self.stats["prefix_hits"] += 1
                self.stats["prefix_tokens_saved"] += length
            self._kv[id(job)], self._fed[id(job)] = kv, kv.length
            with self._cond:
                self._rows.append(job)
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._rows))

    def _step(self) -> None:
        """One forward pass: a token for every decoding row, and prompt chunks (up to
        `prefill_chunk` tokens in all, shortest remaining first) for rows still reading their
        prompt."""
        faults.check("engine.step")
        ids: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        sampled: list[tuple[int, _Job, bool]] = []  # (packed index, job, first token)
        # the prefill budget goes to the prompts with the least left to read first, so a short
        # prompt that arrives while a long one is being read starts at once
        reading = sorted((job for job in self._rows if self._fed[id(job)] < len(job.prompt_ids)),
                         key=lambda job: len(job.prompt_ids) - self._fed[id(job)])
        budget, chunks = max(1, self.config.prefill_chunk), {}
        for job in reading:
            if budget <= 0:
                break
            fed = self._fed[id(job)]
            chunks[id(job)] = job.prompt_ids[fed:fed + budget]
            budget -= len(chunks[id(job)])
        for job in self._rows:
            fed = self._fed[id(job)]
            if fed < len(job.prompt_ids):  # still reading its prompt
                if id(job) not in chunks:
                    continue
                tokens, first = chunks[id(job)], fed
            else:
                tokens, first = [job.next_token], job.position
            segments.append(Segment(len(ids), len(tokens), self._kv[id(job)]))
            ids += tokens
            positions += range(first, first + len(tokens))
            if first + len(tokens) >= len(job.prompt_ids):  # it needs its next token now
                sampled.append((len(ids) - 1, job, fed < len(job.prompt_ids)))
        if len(ids) == 1:
            # one token alone would take the matrix-vector kernels, whose sums round differently
            # from the matrix-matrix ones every larger step uses: a seeded answer would then
            # change with whether it ran alone. A scratch row keeps every step on one path.
            self._scratch.length = 0
            segments.append(Segment(1, 1, self._scratch))
            ids.append(ids[0])
            positions.append(0)
        if any(s.count > 1 for s in segments):
            faults.check("engine.prefill")
            self.stats["prefills"] += 1
        keep = torch.tensor([index for index, _, _ in sampled], dtype=torch.long, device=self.device)
        out = self.model(input_ids=torch.tensor([ids], device=self.device),
                         position_ids=torch.tensor([positions], device=self.device),
                         use_cache=False, logits_to_keep=keep, shoal_segments=segments)
        for segment in segments:
            segment.kv.length += segment.count
        for job in self._rows:
            self._fed[id(job)] = min(len(job.prompt_ids), self._kv[id(job)].length)
        self.stats["steps"] += 1
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self._kv_bytes())
        if not sampled:
            return
        jobs = [job for _, job, _ in sampled]
        tokens, logprobs, tops = choose_tokens(out.logits[0].float(), [job.sampler for job in jobs])
        done: dict[int, str] = {}
        index = {id(job): i for i, job in enumerate(self._rows)}
        for i, ((_, job, first), token, logprob) in enumerate(zip(sampled, tokens, logprobs)):
            job.position = len(job.prompt_ids) if first else job.position + 1
            reason = self._accept(job, token, logprob, tops[i])
            if reason:
                done[index[id(job)]] = reason
        self._remove_rows(sorted(done), done)

    def _remove_rows(self, indices: list[int], reasons: dict[int, str]) -> None:
        if not indices:
            return
        leaving = [self._rows[i] for i in indices]
        for i in indices:
            self._remember_prefix(i)
        faults.check("engine.remove_rows")
        gone = set(indices)
        with self._cond:
            self._rows = [job for i, job in enumerate(self._rows) if i not in gone]
        for job in leaving:
            self._kv.pop(id(job), None)
            self._fed.pop(id(job), None)
        for index, job in zip(indices, leaving):
            self._finish(job, reasons[index])

    def _remember_prefix(self, row: int) -> None:
        job = self._rows[row]
        kv = self._kv.get(id(job))
        if job.handle.cancelled or kv is None or not self.prefix_cache.keeps:
            return
        length = min(kv.length, len(job.prompt_ids) + len(job.generated))
        if length < self.config.min_prefix_tokens or self._fed[id(job)] < len(job.prompt_ids):
            return
        self.prefix_cache.store(job.handle.request.cache_scope,
                                (job.prompt_ids + job.generated)[:length], kv.prefix(length),
                                chat=job.handle.request.cache_key)

    def _fail_all(self, error: ShoalError) -> None:
        self._kv.clear()
        self._fed.clear()
        super()._fail_all(error)

    @property
    def holds_kv(self) -> bool:
        return bool(self._kv)

    def _kv_bytes(self) -> int:
        return sum(kv.reserved_bytes for kv in list(self._kv.values()))

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        if not (self._thread and self._thread.is_alive()):
            self._kv.clear()
            self._fed.clear()


def make_engine(model: torch.nn.Module, decode: Callable[[Sequence[int]], str], **kwargs) -> BatchEngine:
    """The engine for `config.layout`; "auto" is the ragged layout on a CPU when this model's
    attention runs through transformers' attention interface and its packed forward gives the
    logits of a plain one, else the padded layout."""
    config: EngineConfig = kwargs["config"]
    on_cpu = next(model.parameters()).device.type == "cpu"
    if config.layout == "padded" or (config.layout == "auto" and not on_cpu):
        # on CUDA the per-request attention is one kernel launch per request and layer; the
        # padded layout's batched attention is what was measured there
        return BatchEngine(model, decode, **kwargs)
    attention = model.config._attn_implementation
    try:
        engine = RaggedEngine(model, decode, **kwargs)
        _check_ragged(engine)
        return engine
    except Exception as exc:
        if config.layout == "ragged":
            raise
        log.info("engine %s: the padded KV layout (the ragged one does not fit this model: %s)",
                 kwargs.get("name"), exc)
        model.set_attn_implementation(attention)
        return BatchEngine(model, decode, **kwargs)


def _check_ragged(engine: RaggedEngine) -> None:
    """The packed forward of two prompts (one read in two chunks) must give each prompt's last
    logits as a plain forward does."""
    prompts = [[engine._pad_id()] + list(range(5, 17)), [engine._pad_id()] + list(range(40, 47))]
    device, model = engine.device, engine.model
    with torch.inference_mode():
        plain = [model(input_ids=torch.tensor([p], device=device), logits_to_keep=1).logits[0, -1].float()
                 for p in prompts]
        rows = [RowKV(engine._kv_shape, 32, engine._kv_dtype, device) for _ in prompts]
        cut = 6
        first = prompts[0][:cut]
        model(input_ids=torch.tensor([first], device=device),
              position_ids=torch.arange(cut, device=device)[None], use_cache=False, logits_to_keep=1,
              shoal_segments=[Segment(0, cut, rows[0])])
        rows[0].length = cut
        rest = prompts[0][cut:]
        ids = rest + prompts[1]
        positions = list(range(cut, len(prompts[0]))) + list(range(len(prompts[1])))
        out = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                    use_cache=False, shoal_segments=[Segment(0, len(rest), rows[0]),
                                                     Segment(len(rest), len(prompts[1]), rows[1])],
                    logits_to_keep=torch.tensor([len(rest) - 1, len(ids) - 1], device=device))
    tolerance = 1e-3 if engine._kv_dtype == torch.float32 else 5e-2
    for got, want in zip(out.logits[0].float(), plain):
        error = float((got - want).abs().max() / (want.abs().max() + 1e-6))
        if error > tolerance:
            raise NotImplementedError(f"packed logits differ from a plain forward's ({error:.2e})")
