"""What a model registered through the API may point at: data, never code, options or private places.

The operator's catalog file is trusted as written. A spec that came from a caller (registered at
run time, and kept in the registry file) is checked when it is registered and again when it loads,
since files and DNS can change in between:

- `gguf` and `local` paths must lie, after following links, inside one of the model roots
  (`--model-roots`; default: the model cache and the installed model packages).
- `pypi` names are package names (checked for every spec, in `catalog`); `assemble` only for the
  packages the operator's catalog assembles (it imports the package); the `file` is matched
  against the package's own list of files or its wheel's members, never used as a path.
- `openai` / `tgi` URLs: http(s), no credentials in the URL, and a host that resolves to no
  loopback, link-local (cloud metadata lives there), unspecified, multicast or reserved address,
  unless `--allow-private-remotes`. Private-range addresses (10/8, 192.168/16, ...) are allowed:
  that is where a team's inference servers live.

Errors name the field and never quote a file's contents.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .catalog import ModelSpec
from .errors import InvalidParamsError, ModelLoadError

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "metadata.azure.internal"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")})


def package_dirs(names: list[str]) -> list[Path]:
    """The folders installed by these distributions (their top-level packages), without importing them."""
    folders: list[Path] = []
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or () if len(Path(str(f)).parts) > 1}
        for top in sorted(tops):
            if top.endswith((".dist-info", ".data")) or top in ("..", "__pycache__"):
                continue
            folder = Path(str(dist.locate_file(top)))
            if folder.is_dir():
                folders.append(folder.resolve())
    return folders


@dataclass
class SourcePolicy:
    roots: list[Path]
    allow_private_remotes: bool = False
    trusted: list[ModelSpec] = field(default_factory=list)  # the operator's catalog file

    @classmethod
    def for_catalog(cls, trusted: list[ModelSpec], roots: list[Path] | None, cache_dir: Path,
                    allow_private_remotes: bool) -> SourcePolicy:
        if roots is None:
            packages = sorted({s.location for s in trusted if s.source == "pypi"})
            roots = [cache_dir, *package_dirs(packages)]
        return cls([Path(r).expanduser().resolve() for r in roots], allow_private_remotes, list(trusted))

    def is_trusted(self, spec: ModelSpec) -> bool:
        return any(spec == known for known in self.trusted)

    @property
    def assemble_packages(self) -> set[str]:
        return {s.location for s in self.trusted if s.source == "pypi" and s.assemble}

    # ------------------------------------------------------------------ checks
    def check(self, spec: ModelSpec) -> None:
        """For a registration: raises InvalidParamsError naming the field. Resolves DNS: call it
        off the event loop."""
        if self.is_trusted(spec):
            return
        if spec.source in ("gguf", "local"):
            self.local_path(spec, error=InvalidParamsError)
        if spec.source == "pypi" and spec.assemble and spec.location not in self.assemble_packages:
            raise InvalidParamsError(
                "assemble: only packages that the server's catalog assembles may be assembled ("
                + (", ".join(sorted(self.assemble_packages)) or "none") + ")", param="assemble")
        if spec.is_remote:
            for index, url in enumerate((spec.location, *spec.replicas)):
                self.check_url(url, "location" if index == 0 else f"replicas.{index - 1}")

    def local_path(self, spec: ModelSpec, error: type[Exception] = ModelLoadError) -> Path:
        """The spec's file or folder, resolved, if it lies inside a model root."""
        path = Path(spec.location).expanduser()
        if not path.is_absolute():
            raise _error(error, "location", "give an absolute path inside a model root")
        resolved = path.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            raise _error(error, "location", "this path is outside the folders models may be read from (the "
                         "server's --model-roots); put the model there or ask the operator to add its folder")
        return resolved

    def check_url(self, url: str, param: str, error: type[Exception] = InvalidParamsError) -> None:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise _error(error, param, "the port is not valid") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _error(error, param, "give an http:// or https:// base URL")
        if parts.username or parts.password:
            raise _error(error, param, "credentials in the URL are refused; use options.api_key")
        if self.allow_private_remotes:
            return
        host = parts.hostname.rstrip(".").lower()
        private = f"{host} is a loopback, link-local or metadata address; refused unless the server " \
                  "runs with --allow-private-remotes"
        if host in METADATA_HOSTS or host == "localhost" or host.endswith(".localhost"):
            raise _error(error, param, private)
        try:
            infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80),
                                       proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            raise _error(error, param, f"the host {host} cannot be resolved") from None
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            address = getattr(address, "ipv4_mapped", None) or address
            if (address.is_loopback or address.is_link_local or address.is_unspecified or address.is_multicast
                    or address.is_reserved or address in METADATA_ADDRESSES):
                raise _error(error, param, private)


def _error(kind: type[Exception], param: str, message: str) -> Exception:
    if kind is InvalidParamsError:
        return InvalidParamsError(f"{param}: {message}", param=param)
    return kind(f"{param}: {message}")
