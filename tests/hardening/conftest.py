"""Helpers for hardening tests: a catalog of the tiny random-weight model (fast, for mechanics) and
real `python app.py` processes on loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_CACHE, ROOT, free_port


@pytest.fixture(scope="session")
def tiny_catalog(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "models.toml"
    path.write_text(f'[[model]]\nname = "tiny"\nversion = "1"\nsource = "local"\nlocation = "{tiny_model_dir}"\n'
                    'kind = "chat"\n')
    return path


class AppProcess:
    def __init__(self, data_dir: Path, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.output = ""

    def start(self, timeout: float = 120) -> AppProcess:
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--model-cache-dir", str(MODEL_CACHE), "--log-level", "info", *self.args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited: {self.proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("app did not become ready")

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self.output = self.proc.stdout.read()
        return code

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
