"""`python app.py` as a user runs it: --help documents the settings, SHOAL_* variables and flags
take effect, and --share offline fails with a clear message while the app keeps serving."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests import files
from tests.conftest import MODEL_CACHE, ROOT, free_port


def test_help_documents_every_setting():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--data-dir", "--catalog", "--memory-budget", "--api-keys", "--log-level",
                 "--max-batch-size", "--queue-size", "--rate-limit-rpm", "--share"):
        assert flag in out.stdout


def test_app_starts_from_env_and_flags_and_share_fails_clearly_offline(tmp_path):
    port = free_port()
    env = {**os.environ, "SHOAL_DATA_DIR": str(tmp_path / "data"), "SHOAL_MODEL_CACHE_DIR": str(MODEL_CACHE),
           "SHOAL_PRELOAD": "[]", "GRADIO_SHARE_SERVER_ADDRESS": "127.0.0.1:9"}  # a share server that is not there
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--share", "--memory-budget", "3GB"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
        assert {m["state"] for m in models} == {"unloaded"}  # SHOAL_PRELOAD=[] was honoured
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "shoal_memory_budget_bytes 3e+09" in metrics  # so was --memory-budget
        time.sleep(2)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200  # still serving
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert "Could not create a public share link" in output and "keeps running locally" in output


def test_the_default_start_serves_llama_cpp_without_loading_torch(tmp_path):
    """Shoal's own process stays lean while every model it serves runs in llama-server: no torch
    (~0.3 GB resident) until a transformers model loads, also once a PDF is indexed and a question
    about it answered (retrieval's embedding model runs in llama.cpp too, counted in the pool).
    Checked in the running process's maps."""
    from llm_pool import llamacpp_build
    from tests.hardening.conftest import AppProcess
    if llamacpp_build.find_server() is None:
        pytest.skip("llama.cpp is not built (scripts/setup.sh --dev builds it)")
    app = AppProcess(tmp_path / "data", "--memory-budget", "3GB").start(timeout=180)
    try:
        answer = httpx.post(f"{app.url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8})
        assert answer.status_code == 200 and answer.json()["model"].startswith("smollm2-135m")
        session = httpx.post(f"{app.url}/v1/sessions", json={"title": "a story"}).json()["id"]
        upload = httpx.post(f"{app.url}/v1/sessions/{session}/files", timeout=60,
                            files={"file": ("story.pdf", files.pdf_bytes(), "application/pdf")})
        assert upload.status_code == 202, upload.text
        deadline = time.monotonic() + 120
        while (file := httpx.get(f"{app.url}/v1/sessions/{session}/files").json()["data"][0])["status"] != "ready":
            assert file["status"] != "failed" and time.monotonic() < deadline, file
            time.sleep(0.5)
        turn = httpx.post(f"{app.url}/v1/sessions/{session}/messages", timeout=120, json={
            "content": "Who logged every storm?", "params": {"max_new_tokens": 8}})
        assert turn.status_code == 200 and turn.json()["sources"], turn.text
        embedder = httpx.get(f"{app.url}/v1/models/all-minilm-l6-v2").json()
        assert embedder["engine"] == "llama.cpp" and embedder["state"] == "ready"  # one copy, in the pool
        pid = app.proc.pid
        assert "libtorch" not in open(f"/proc/{pid}/maps").read()
        rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
        assert rss < 400 * 1024  # kB: Shoal's own process, the model's llama-server apart
    finally:
        app.stop()
