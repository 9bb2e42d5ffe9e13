"""Shoal's settings: one schema for CLI flags, `SHOAL_*` environment variables and defaults.

`Settings.from_cli(argv)` parses flags (documented by `python app.py --help`); environment variables
fill what flags leave out; the defaults below fill the rest. Nothing else in Shoal reads the
environment: the composition root (`app.py`) builds a `Settings` once and passes parts of it on.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, CliApp, NoDecode, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: str | int | float) -> int:
    """'6GB' -> 6e9, '512MiB' -> 536870912, 1024 -> 1024."""
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 6GB, 512MiB or a number of bytes)")
    unit = (match.group(2) or "").lower().rstrip("b")
    return int(float(match.group(1)) * _UNITS[unit])


def machine_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


class Settings(BaseSettings):
    """Shoal: a pool of LLMs behind a chat UI and an OpenAI/TGI-compatible API."""

    model_config = SettingsConfigDict(
        env_prefix="SHOAL_", cli_prog_name="python app.py", cli_kebab_case=True,
        cli_implicit_flags=True, populate_by_name=True, extra="ignore",
    )

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all interfaces).")
    port: int = Field(7860, ge=0, le=65535, description="TCP port for the UI and the API.")
    data_dir: Path = Field(ROOT / "data", description="Where sessions, files and caches live.")
    model_cache_dir: Path | None = Field(
        None, description="Where converted model weights are cached (default: DATA_DIR/models).")
    catalog: Path = Field(ROOT / "models.toml", description="The model catalog (TOML).")
    memory_budget: str = Field(
        "auto", description="Bytes of RAM (or VRAM) the pool may use for models and their KV "
        "caches, e.g. 6GB; 'auto' = half the machine's memory (90% of VRAM on a GPU).")
    default_model: str | None = Field(
        None, description="Model used when a request names none (default: the catalog's first).")
    preload: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Models to load at start-up (default: the default model). Use "
        "--preload '[]' to load nothing until asked.")
    device: str = Field("auto", description="auto, cpu or cuda[:N]; overrides 'auto' in the catalog.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys; when set, every route but /health, /health/ready and "
        "/login needs one. Comma-separated (or a JSON list).")
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Admin keys: register, load, unload, pin, swap and roll back models. "
        "They are API keys too. Without any, admin actions are allowed only from loopback (see "
        "--trust-loopback). Comma-separated (or a JSON list).")
    trust_loopback: bool = Field(
        True, description="With no admin keys, treat clients on 127.0.0.1/::1 as the machine's owner (admin "
        "actions; with no API keys, the REST sessions too). Turned off on a Space and with --share, whose "
        "tunnel connects from loopback; turn it off behind a reverse proxy on this machine.")
    forwarded_allow_ips: str = Field(
        "", description="Proxies whose X-Forwarded-For is believed for the client address (uvicorn's "
        "setting; '*' for any). Empty: the TCP peer is the client.")
    model_roots: Annotated[list[Path] | None, NoDecode] = Field(
        None, description="Folders that models registered through the API may be read from (gguf and local "
        "sources). Default: the model cache and the installed model packages. Comma-separated.")
    allow_private_remotes: bool = Field(
        False, description="Let remote models registered through the API point at loopback, link-local or "
        "cloud-metadata addresses (refused by default).")
    max_request_mb: float = Field(
        4.0, gt=0, description="Largest request body outside file uploads, in MB (larger: 413 at once).")
    max_message_chars: int = Field(
        200_000, ge=1, description="Longest content of one chat message or prompt, in characters (413).")
    session_secret: str | None = Field(
        None, description="Secret that signs the browser's user id (default: generated once and "
        "kept in DATA_DIR).")
    log_level: str = Field("info", description="debug, info, warning or error.")
    load_timeout: float = Field(300.0, gt=0, description="Seconds a request waits for its model to load.")
    max_batch_size: int = Field(16, ge=1, le=256, description="Concurrent generations per model (llama.cpp: "
                                "its slots).")
    build_llama_cpp: bool = Field(
        True, description="When llama.cpp is not built yet, build it in the background (~10-12 minutes on 2 "
        "cores, once) while its models are served by their transformers versions, then swap them over.")
    queue_size: int = Field(64, ge=0, description="Requests that may wait per model beyond the batch.")
    queue_timeout: float = Field(120.0, gt=0, description="Seconds a request may wait in the queue.")
    kv_cache_budget: str = Field(
        "auto", description="KV-cache bytes per loaded model (counted in the budget). 'auto': 512MiB on "
        "transformers; on llama.cpp a KV per slot holding the whole window where that takes at most half "
        "the memory budget (what `llama-server -np N` allocates), else 512MiB unified (see --kv-layout).")
    kv_disk_budget: str = Field(
        "2GiB", description="Disk kept for chats' KV caches (in the data dir): a chat reopened after its model was "
        "unloaded or Shoal restarted continues without reading its history again. Least recently used chats "
        "go first; 0 = off.")
    kv_layout: Literal["auto", "ragged", "padded"] = Field(
        "auto", description="transformers engine: 'ragged' (each request its own KV, prompts read in chunks "
        "beside running streams), 'padded' (one shared left-padded buffer, the earlier engine), 'auto' "
        "(ragged on a CPU where the model's attention allows it). llama.cpp: 'ragged' = a KV per slot, each "
        "the whole window; 'padded' = one unified KV; 'auto' = a KV per slot when the KV budget holds "
        "window x slots.")
    prefill_chunk: int = Field(256, ge=16, le=65536, description="transformers engine, ragged layout: prompt "
                               "tokens read per step while other streams run.")
    llamacpp_batch: int = Field(512, ge=16, le=65536, description="llama.cpp: prompt tokens read per step (its "
                                "-b/-ub; a prompt of more than 256 new tokens arriving beside running streams is "
                                "read 128 per step, at most half of this). Measured at 32 clients: 512 reads a "
                                "burst of new prompts in fewer steps than 256 (1.03x the bare llama-server's "
                                "tok/s, TTFT p99 4.0 s, against 0.92x and 5.6 s).")
    rate_limit_rpm: float = Field(0, ge=0, description="Requests per minute per client (0 = off).")
    rate_limit_tpm: float = Field(0, ge=0, description="Generated tokens per minute per client (0 = off).")
    database_url: str | None = Field(
        None, description="PostgreSQL for the sessions, messages, files and passages, shared by replicas: "
        "postgresql://user:password@host:port/db. Default: none, an embedded SQLite store in DATA_DIR/sessions.")
    redis_url: str | None = Field(
        None, description="Redis for state shared by replicas: rate-limit buckets. redis://host:port/db, "
        "rediss:// or unix://; default: none, each process keeps its own.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (off when empty).")
    max_upload_mb: float = Field(25.0, gt=0, description="Largest file a user may upload, in MB.")
    parse_timeout: float = Field(60.0, gt=0, description="Seconds one file may take to parse before it is stopped.")
    parse_memory: str = Field("2GiB", description="Memory one file's parser may use before it is stopped.")
    index_niceness: int = Field(10, ge=0, le=19, description="CPU niceness of reading and embedding uploaded "
                                "files, so running chats come first (0 = same priority as chats).")
    index_yield_seconds: float = Field(1.0, ge=0, le=60, description="While chats are generating, indexing embeds "
                                       "one small batch, and the file's parser runs 0.1 s, per this many seconds "
                                       "(0 = never step aside).")
    # --- quotas ---
    max_sessions_per_user: int = Field(500, ge=0, description="Chat sessions one user may keep (then 429; "
                                       "0 = no limit).")
    max_messages_per_session: int = Field(2000, ge=0, description="Messages (yours and the replies) one session "
                                          "may hold (then 429: start a new chat; 0 = no limit).")
    max_system_prompt_chars: int = Field(20_000, ge=0, description="Longest system prompt of a session, in "
                                         "characters (then 413; 0 = no limit).")
    max_files_per_user: int = Field(100, ge=0, description="Uploaded files one user may keep, over all their "
                                    "sessions (then 429; 0 = no limit).")
    max_stored_mb_per_user: float = Field(500.0, ge=0, description="MB of uploaded files one user may keep, over "
                                          "all their sessions (then 413; 0 = no limit).")
    max_uploads_per_minute: float = Field(20.0, ge=0, description="Files one user may upload per minute (then "
                                          "429 with Retry-After; 0 = no limit).")
    min_free_disk_mb: float = Field(512.0, ge=0, description="Free space kept on the data dir's disk: an upload "
                                    "that would go below it is refused with 507 (chats go on).")
    # --- edge ---
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host names this server answers to besides its own (localhost, "
        "127.0.0.1, [::1], any IP address, --host, the Space's name, *.gradio.live with --share), e.g. a "
        "reverse proxy's name; '*.example.com' matches subdomains, '*' any name. Other names get 421 (so DNS "
        "rebinding reads nothing). Comma-separated.")
    max_login_failures: int = Field(
        10, ge=0, description="Wrong keys one address may send (sign-in page, key headers, the WebSocket's auth "
        "message) per --login-window; then every key from it is refused with 429 until the window passes "
        "(0 = no limit).")
    max_login_failures_per_prefix: int = Field(
        30, ge=0, description="Wrong keys sharing their first 8 characters, from any address, per "
        "--login-window; then keys with that prefix are refused with 429 (0 = no limit).")
    login_window: float = Field(300.0, gt=0, description="Seconds over which failed keys are counted.")
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a connection may take to send a request's line and headers (an idle "
        "new connection too); then it is closed (408).")
    min_body_rate_kb: float = Field(
        1.0, ge=0, description="Slowest a request body may arrive, in KB/s, measured over --header-timeout "
        "windows while the server is reading it; slower connections are closed (0 = no floor).")
    max_connections_per_client: int = Field(
        64, ge=0, description="Open connections one client address may hold; more get 429 and are closed. "
        "Proxies named in --forwarded-allow-ips (and the share tunnel) are not counted. Off on a Space, "
        "where every connection comes from its proxy (0 = no limit).")
    max_websockets_per_client: int = Field(
        16, ge=0, description="Open WebSockets one client address may hold; more are closed with code 4429 "
        "(0 = no limit).")
    # --- fairness ---
    max_running_per_caller: int = Field(
        1, ge=0, description="Generations one caller (an API key's owner, a signed browser id, else a client "
        "address) may have running at once in one model, each of n choices and each batch item counted, and "
        "never more than 3/4 of --max-batch-size, so others always find a free slot; the rest wait in the "
        "caller's own queue, served in turn with other callers'. The trusted local owner is not limited "
        "(0 = no limit).")
    max_queued_per_caller: int = Field(
        8, ge=0, description="Requests one caller may have waiting for one model (generations; embeddings "
        "alike) besides those running; more get 429 (0 = no limit but --queue-size).")
    embedding_concurrency: int = Field(
        1, ge=1, le=16, description="Embedding and rerank requests computed at once, on threads of their own "
        "(never generation's); the rest wait, served in turn between callers.")
    max_embedding_tokens: int = Field(
        8192, ge=1, description="Tokens one /v1/embeddings, /api/embed or /v1/rerank request may send in all "
        "(the query and every document or input); more get 413.")
    # --- gradio ---
    upload_budget_mb: float = Field(
        200.0, ge=0, description="MB one client (a key's owner, else an address) may send to the web UI's upload "
        "route per --upload-window; more gets 429 with Retry-After (0 = no limit).")
    upload_budget_files: int = Field(
        60, ge=0, description="Files one client may upload through the web UI per --upload-window (then 429; "
        "0 = no limit).")
    upload_window: float = Field(600.0, gt=0, description="Seconds over which --upload-budget-mb and "
                                 "--upload-budget-files are counted.")
    upload_ttl: float = Field(
        300.0, gt=0, description="Seconds a file uploaded to the web UI is kept for the event that uses it; then "
        "it is deleted (a file a chat took is deleted as soon as the chat has read it).")
    # --- MCP ---
    mcp_config: Path | None = Field(
        None, description="A JSON file naming MCP servers ({\"mcpServers\": {name: {command, args, env} or {url, "
        "headers}}}, as Claude Desktop's): their tools can be enabled per chat and per Responses request. "
        "Commands, URLs, environments and headers are never shown.")
    mcp_timeout: float = Field(30.0, gt=0, le=600, description="Seconds one MCP tool call may take.")
    mcp_max_steps: int = Field(
        5, ge=1, le=50, description="MCP tool calls Shoal runs for one turn or response before it stops "
        "calling (the call -> result -> continue loop).")
    mcp_max_result_chars: int = Field(16_000, ge=100, description="Characters of an MCP tool's result the model "
                                      "reads (the rest is cut).")
    share: bool = Field(False, description="Ask Gradio for a public share link.")
    drain_timeout: float = Field(30.0, ge=0, description="On SIGTERM, seconds in-flight requests get to finish.")

    @field_validator("api_keys", "admin_keys", "cors_origins", "preload", "model_roots", "allowed_hosts",
                     mode="before")
    @classmethod
    def _split_commas(cls, value):
        """Env values and flags arrive as text: 'k1,k2' or a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError("not a JSON list; use comma-separated values or [\"a\", \"b\"]") from None
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("memory_budget", "kv_cache_budget", "kv_disk_budget")
    @classmethod
    def _check_size(cls, value: str) -> str:
        if value != "auto":
            parse_size(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        return _server_url(value, {"postgresql", "postgres"}, "database_url (--database-url) is not a PostgreSQL "
                           "URL: use postgresql://user:password@host:port/database")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        return _server_url(value, {"redis", "rediss", "unix"}, "redis_url (--redis-url) is not a Redis URL: use "
                           "redis://host:port/db, rediss://host:port/db or unix:///path/to/socket")

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("log level must be debug, info, warning, error or critical")
        return value.lower()

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> Settings:
        return CliApp.run(cls, cli_args=argv if argv is not None else [])

    @property
    def models_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def loopback_trusted(self) -> bool:
        return self.trust_loopback and not self.share

    def memory_budget_bytes(self, gpu_total: int | None = None) -> int:
        if self.memory_budget != "auto":
            return parse_size(self.memory_budget)
        if gpu_total:
            return int(gpu_total * 0.9)
        return machine_memory_bytes() // 2

    def kv_cache_bytes(self) -> int:
        return 512 * 2**20 if self.kv_cache_budget == "auto" else parse_size(self.kv_cache_budget)

    def llamacpp_kv_bytes(self, gpu_total: int | None = None) -> int:
        if self.kv_cache_budget != "auto":
            return parse_size(self.kv_cache_budget)
        return max(self.kv_cache_bytes(), self.memory_budget_bytes(gpu_total) // 2)

    def cli_cmd(self) -> None:  # CliApp.run calls this; app.py does the work.
        return None


def _server_url(value: str | None, schemes: set[str], wrong: str) -> str | None:
    """A shared server's URL of one of `schemes` (None when empty); else ValueError(`wrong`)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in schemes:
        raise ValueError(wrong)
    return value
