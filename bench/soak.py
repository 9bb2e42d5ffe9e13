"""Soak run of the durability loop: kill -9 the server during chat traffic many times, then check
that every acknowledged turn survived and the store is sound.

    .venv/bin/python bench/soak.py [iterations=30]

It runs tests/hardening/test_durability.py with SHOAL_SOAK_ITERATIONS set (the normal test run
uses 3 iterations).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    iterations = sys.argv[1] if len(sys.argv) > 1 else "30"
    env = {**os.environ, "SHOAL_SOAK_ITERATIONS": iterations}
    started = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/hardening/test_durability.py::test_kill_minus_nine_during_chat_loses_no_acknowledged_turn"],
                           cwd=ROOT, env=env)
    outcome = "passed" if code == 0 else "FAILED"
    print(f"{iterations} kill -9 iterations: {outcome} in {time.monotonic() - started:.0f} s")
    sys.exit(code)
