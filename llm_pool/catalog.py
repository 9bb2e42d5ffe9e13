"""The model catalog: which models exist, in which versions, from which sources.

A `ModelSpec` is one version of one model. Specs come from a TOML file (`models.toml`) and from
registrations made at run time (kept in a JSON file beside the data, so they survive restarts).
A model name is an alias: the catalog knows each name's versions and which one is the default;
the pool decides which version is active. The catalog knows nothing about loading.
"""

from __future__ import annotations

import json
import os
import re
import threading
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConflictError, InvalidParamsError, ModelNotFoundError
from .params import keep_alive_seconds

SOURCES = ("pypi", "gguf", "local", "hub", "openai", "tgi")
REMOTE_SOURCES = ("openai", "tgi")
KINDS = ("chat", "completion", "embedding")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "bnb-4bit", "bnb-8bit")
ENGINES = ("auto", "transformers", "llama.cpp")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PACKAGE_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?$")  # a PyPI distribution name
HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
# Remote options: (type, lowest, highest); api_key is a secret (stored 0600, never shown).
REMOTE_OPTIONS = {"timeout": (float, 0.1, 3600), "connect_timeout": (float, 0.1, 120),
                  "max_connections": (int, 1, 4096), "retries": (int, 0, 10),
                  "health_interval": (float, 0.5, 3600), "api_key": (str, 1, 4096)}


@dataclass(frozen=True)
class ModelSpec:
    """One version of one model, as the catalog describes it."""

    name: str
    version: str
    source: str  # one of SOURCES
    kind: str = "chat"  # chat (has a chat template) or completion (raw text)
    location: str = ""  # package (pypi), file (gguf), folder (local), repo id (hub), URL (remote)
    file: str | None = None  # the .gguf inside a package, folder or repo
    assemble: bool = False  # pypi: the package joins chunks with assemble(output_path=...)
    dtype: str = "auto"
    quantization: str | None = None  # bitsandbytes 4/8-bit; CUDA only
    device: str = "auto"
    context_length: int | None = None  # None: from the model's config
    description: str = ""
    chat_template: str | None = None  # overrides the tokenizer's
    replicas: tuple[str, ...] = ()  # remote: extra base URLs serving the same model
    remote_model: str | None = None  # remote: the model name the upstream server knows
    options: dict[str, Any] = field(default_factory=dict)  # remote: timeouts, limits, api_key_env
    # auto: llama.cpp for a GGUF on a CPU, transformers for folders, Hub models and on CUDA
    engine: str = "auto"
    # unload after this many idle seconds (Ollama's keep_alive: "5m", 300; 0 = as soon as idle);
    # None: stays loaded until evicted or unloaded
    idle_unload: float | None = None

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def is_remote(self) -> bool:
        return self.source in REMOTE_SOURCES

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["replicas"] = list(self.replicas)
        data["options"] = {k: v for k, v in self.options.items() if "key" not in k.lower()}
        return data


def spec_from_dict(data: dict[str, Any]) -> ModelSpec:
    """Build and validate a spec; raises InvalidParamsError naming the bad field."""
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidParamsError(f"unknown model field '{unknown[0]}'", param=unknown[0])
    for required in ("name", "version", "source"):
        if not data.get(required):
            raise InvalidParamsError(f"model field '{required}' is required", param=required)
    values = dict(data)
    values["version"] = str(values["version"])
    values["replicas"] = tuple(values.get("replicas") or ())
    values["options"] = dict(values.get("options") or {})
    if values.get("idle_unload") is not None:
        values["idle_unload"] = keep_alive_seconds(values["idle_unload"], "idle_unload")
    spec = ModelSpec(**values)
    _validate(spec)
    return spec


def _validate(spec: ModelSpec) -> None:
    def bad(field_name: str, message: str) -> InvalidParamsError:
        return InvalidParamsError(f"{field_name}: {message}", param=field_name)

    if not isinstance(spec.name, str) or not NAME_RE.match(spec.name):
        raise bad("name", "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not NAME_RE.match(spec.version):
        raise bad("version", "use 1-64 letters, digits, '.', '_' or '-'")
    if spec.source not in SOURCES:
        raise bad("source", f"must be one of {', '.join(SOURCES)}")
    if spec.kind not in KINDS:
        raise bad("kind", "must be 'chat', 'completion' or 'embedding'")
    if spec.kind == "embedding" and (spec.is_remote or spec.engine != "auto" or spec.quantization):
        raise bad("kind", "an embedding model runs here on sentence-transformers: a model folder or a "
                          "GGUF (pypi, local, gguf or hub), with no engine or quantization")
    if spec.dtype not in DTYPES:
        raise bad("dtype", f"must be one of {', '.join(DTYPES)}")
    if spec.engine not in ENGINES:
        raise bad("engine", f"must be one of {', '.join(ENGINES)}")
    if spec.engine == "llama.cpp":
        if spec.source not in ("pypi", "gguf", "hub") or (spec.source == "hub" and not spec.file):
            raise bad("engine", "llama.cpp runs GGUF files: a pypi, gguf or hub source with a .gguf file")
        if spec.dtype != "auto" or spec.quantization or spec.device.startswith("cuda"):
            raise bad("engine", "dtype, quantization and cuda devices are transformers settings; "
                                "llama.cpp runs the GGUF as it is, on the CPU")
    if spec.engine != "auto" and spec.source in REMOTE_SOURCES:
        raise bad("engine", "a remote source runs on its server's engine; leave engine out")
    if spec.quantization not in QUANTIZATIONS:
        raise bad("quantization", "must be bnb-4bit, bnb-8bit or absent")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", spec.device):
        raise bad("device", "must be auto, cpu, cuda or cuda:N")
    if spec.context_length is not None and not (isinstance(spec.context_length, int)
                                                and 16 <= spec.context_length <= 10_000_000):
        raise bad("context_length", "must be an integer of at least 16")
    if not spec.location:
        raise bad("location", f"a {spec.source} source needs a location")
    if spec.source == "pypi" and not (spec.file or spec.assemble):
        raise bad("file", "a pypi source needs the GGUF's path (or, for an embedding model, the model "
                          "folder's) inside the package, or assemble = true")
    if spec.source == "pypi" and not PACKAGE_RE.match(spec.location):
        raise bad("location", "a pypi source's location is a package name (letters, digits, '.', '_', '-')")
    if spec.source == "hub" and (not HUB_RE.match(spec.location) or ".." in spec.location):
        raise bad("location", "a hub source's location is a repo id such as org/name")
    if spec.file is not None and (not re.match(r"^[A-Za-z0-9_.][A-Za-z0-9_./+-]*$", spec.file)
                                  or ".." in spec.file.split("/") or spec.file.startswith("/")):
        raise bad("file", "give the file's relative path inside the package or repo (no '..')")
    if spec.is_remote:
        _validate_options(spec.options, bad)
    elif spec.options:
        raise bad("options", "options are for remote sources")
    if spec.is_remote and not re.match(r"^https?://", spec.location):
        raise bad("location", "a remote source's location is its base URL (http:// or https://)")
    for url in spec.replicas:
        if not spec.is_remote or not re.match(r"^https?://", url):
            raise bad("replicas", "replicas are base URLs of remote sources")


def _validate_options(options: dict[str, Any], bad) -> None:
    for name, value in options.items():
        if name not in REMOTE_OPTIONS:
            raise bad("options", f"unknown option '{name}' (known: {', '.join(REMOTE_OPTIONS)})")
        kind, low, high = REMOTE_OPTIONS[name]
        if kind is str:
            if not isinstance(value, str) or not low <= len(value) <= high:
                raise bad("options", f"{name} must be a string of {low} to {high} characters")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or (kind is int and not float(value).is_integer()):
            raise bad("options", f"{name} must be a number from {low} to {high}")


class Catalog:
    """Specs by name and version. Thread-safe; registrations persist to `registry_path`."""

    def __init__(self, specs: list[ModelSpec], registry_path: Path | None = None):
        self._lock = threading.Lock()
        self._specs: dict[str, dict[str, ModelSpec]] = {}
        self._registry_path = registry_path
        self._registered: list[ModelSpec] = []
        self.builtin = list(specs)  # the operator's catalog file: trusted as written
        for spec in specs:
            self._insert(spec)
        if registry_path and registry_path.exists():
            for item in json.loads(registry_path.read_text() or "[]"):
                spec = spec_from_dict(item)
                self._insert(spec, replace_existing=True)
                self._registered.append(spec)

    @classmethod
    def from_toml(cls, path: Path, registry_path: Path | None = None) -> Catalog:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidParamsError(f"catalog file {path} does not exist", param="catalog") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidParamsError(f"catalog file {path} is not valid TOML: {exc}",
                                     param="catalog") from None
        specs = []
        for index, entry in enumerate(data.get("model", [])):
            try:
                specs.append(spec_from_dict(entry))
            except InvalidParamsError as exc:
                raise InvalidParamsError(f"{path}, model #{index + 1}: {exc.message}",
                                         param=exc.param) from None
        return cls(specs, registry_path)

    def _insert(self, spec: ModelSpec, replace_existing: bool = False) -> None:
        versions = self._specs.setdefault(spec.name, {})
        if spec.version in versions and not replace_existing:
            raise ConflictError(f"model '{spec.name}' already has a version '{spec.version}'")
        versions[spec.version] = spec

    def register(self, spec: ModelSpec) -> ModelSpec:
        """Add a model or a new version of one; persisted for the next start."""
        with self._lock:
            self._insert(spec)
            self._registered.append(spec)
            self._save()
        return spec

    def _save(self) -> None:
        if not self._registry_path:
            return
        self._registry_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._registry_path.with_suffix(".tmp")
        text = json.dumps([s.public() | {"options": s.options} for s in self._registered], indent=2)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold remote api keys
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self._registry_path)

    @property
    def registry_path(self) -> Path | None:
        return self._registry_path

    def names(self) -> list[str]:
        with self._lock:
            return list(self._specs)

    def versions(self, name: str) -> list[ModelSpec]:
        with self._lock:
            if name not in self._specs:
                raise ModelNotFoundError(name)
            return list(self._specs[name].values())

    def get(self, name: str, version: str | None = None) -> ModelSpec:
        with self._lock:
            versions = self._specs.get(name)
            if not versions:
                raise ModelNotFoundError(name)
            if version is None:
                return next(iter(versions.values()))
            if version not in versions:
                raise ModelNotFoundError(name, version)
            return versions[version]

    def all(self) -> list[ModelSpec]:
        with self._lock:
            return [spec for versions in self._specs.values() for spec in versions.values()]
