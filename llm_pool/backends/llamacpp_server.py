"""One private `llama-server` process: started on a free loopback port with a random key, waited
for until it answers, measured, and stopped. Used by the generation engine (`llamacpp.py`) and the
embedding engine (`llamacpp_embedding.py`) alike.

The servers are started from one long-lived thread, with PR_SET_PDEATHSIG: Linux sends them
SIGTERM when the thread that forked them ends, and this thread ends only with Shoal itself (also
when Shoal is killed with -9), so no llama-server outlives the process that owns it. The key goes
in the environment, not the command line that `ps` shows every local user.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ..errors import ModelLoadError

log = logging.getLogger("shoal.llamacpp")
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp-spawn")


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux/glibc: unload and shutdown still stop the server
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """`start()` runs `binary args...` and returns once /health answers; `http` is a client that
    carries the key. `key` names the model in errors; `log_dir` keeps the server's log."""

    def __init__(self, binary: Path, args: list[str], key: str, log_dir: Path):
        self.binary, self.args, self.key = binary, args, key
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{key.replace('@', '_')}.log"
        self.process: subprocess.Popen | None = None
        self.base = ""
        self.port = 0
        self.headers: dict[str, str] = {}
        self.http: httpx.Client | None = None

    def start(self, timeout: float = 300) -> LlamaServer:
        port, secret = _free_port(), secrets.token_urlsafe(24)
        command = [str(self.binary), "--host", "127.0.0.1", "--port", str(port), *self.args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LLAMA_API_KEY": secret,
               "HOME": os.environ.get("HOME", "/tmp")}
        with open(self.log_path, "w") as out:
            self.process = _spawner.submit(subprocess.Popen, command, preexec_fn=_die_with_parent,
                                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True).result()
        self.base, self.port = f"http://127.0.0.1:{port}", port
        self.headers = {"Authorization": f"Bearer {secret}"}
        self.http = httpx.Client(base_url=self.base, headers=self.headers, timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.log_tail("exited while loading")
                raise ModelLoadError(f"model '{self.key}': llama.cpp exited while loading "
                                     f"(exit code {self.process.returncode}; details in the server log)")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ModelLoadError(f"model '{self.key}': llama.cpp did not get ready in {timeout:.0f} s")
            time.sleep(0.1)
        probe = self.http.post("/tokenize", json={"content": "hello"})
        if probe.status_code != 200:  # a key mismatch or an odd build: fail now, not per request
            self.stop()
            raise ModelLoadError(f"model '{self.key}': llama.cpp refused its own key ({probe.status_code})")
        return self

    def exited(self) -> int | None:
        """The exit code if the server stopped, else None."""
        return self.process.poll() if self.process is not None else None

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def resident_bytes(self) -> int | None:
        """The process's resident memory now (weights are mapped: pages in use count)."""
        process = self.process
        if process is None:
            return None
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def log_tail(self, what: str) -> None:
        try:
            tail = self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            tail = ""
        log.warning("model %s: llama.cpp %s; the end of its log:\n%s", self.key, what, tail)
