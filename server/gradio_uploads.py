"""Files sent to Gradio's upload route: whose they are, how much each client has sent lately,
and when each is deleted.

- Budget: per client (a valid key's owner, else the client address: `Caller.rate_key`), bytes and
  files over a sliding window (`--upload-budget-mb`, `--upload-budget-files`, `--upload-window`).
  Bytes are counted as they arrive, so parallel uploads share one budget.
- Ownership: an upload belongs to the clients that sent it (the path is Gradio's, named after the
  content's hash, so two clients sending the same file share it). An event may name only files its
  client owns (`owns`).
- Lifetime: an upload lives `--upload-ttl` seconds; an event that uses it (a claim) gives it
  `--upload-ttl` more from then, once; the UI handlers delete it as soon as they have read it
  (`discard`). `sweep` deletes the expired ones, and partial files an aborted upload left behind.

Knows nothing about HTTP or Gradio's objects; `server/gradio_guard.py` drives it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from llm_pool.errors import QuotaExceededError

MB = 1_000_000


@dataclass
class _Sent:
    at: float
    bytes: int = 0
    files: int = 1  # an upload request costs one file at least, even if it stores none


@dataclass
class _Upload:
    expires: dict[str, float] = field(default_factory=dict)  # client -> when its hold ends
    claimed: set[str] = field(default_factory=set)


class UploadLedger:
    def __init__(self, *, budget_bytes: int, budget_files: int, window: float, ttl: float, folder: Path,
                 clock=time.monotonic):
        self.budget_bytes, self.budget_files, self.window, self.ttl = budget_bytes, budget_files, window, ttl
        self.folder = folder
        self._clock = clock
        self._sent: dict[str, deque[_Sent]] = {}
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, folder: Path) -> UploadLedger:
        return cls(budget_bytes=int(settings.upload_budget_mb * MB), budget_files=settings.upload_budget_files,
                   window=settings.upload_window, ttl=settings.upload_ttl, folder=folder)

    # ------------------------------------------------------------------ budget
    def begin(self, client: str, declared: int | None) -> _Sent:
        """Admit one upload request (429 when the client's budget is spent, or would be by the
        body it announces); returns its entry, which `add_bytes` and `add_files` then charge."""
        now = self._clock()
        with self._lock:
            sent = self._recent(client, now)
            files = sum(s.files for s in sent)
            if self.budget_files and files >= self.budget_files:
                raise self._refusal(sent, now, f"{files} files", f"{self.budget_files} files",
                                    "--upload-budget-files")
            used = sum(s.bytes for s in sent)
            if self.budget_bytes and used + (declared or 0) > self.budget_bytes:
                raise self._refusal(sent, now, f"{used / MB:.1f} MB", f"{self.budget_bytes / MB:g} MB",
                                    "--upload-budget-mb",
                                    f"this upload ({(declared or 0) / MB:.1f} MB) is more than is left of")
            entry = _Sent(now)
            sent.append(entry)
            return entry

    def add_bytes(self, client: str, entry: _Sent, count: int) -> None:
        """Charge bytes as they arrive; raises 429 once the client's window holds more than its budget."""
        with self._lock:
            entry.bytes += count
            if not self.budget_bytes:
                return
            now = self._clock()
            sent = self._recent(client, now)
            used = sum(s.bytes for s in sent)
            if used > self.budget_bytes:
                raise self._refusal(sent, now, f"{used / MB:.1f} MB", f"{self.budget_bytes / MB:g} MB",
                                    "--upload-budget-mb")

    def add_files(self, client: str, entry: _Sent, count: int) -> None:
        """Charge the files one request stored; raises 429 if they take the client past its budget."""
        with self._lock:
            entry.files = max(1, count)
            if not self.budget_files:
                return
            now = self._clock()
            sent = self._recent(client, now)
            files = sum(s.files for s in sent)
            if files > self.budget_files:
                raise self._refusal(sent, now, f"{files} files", f"{self.budget_files} files",
                                    "--upload-budget-files")

    def _recent(self, client: str, now: float) -> deque[_Sent]:
        sent = self._sent.setdefault(client, deque())
        while sent and sent[0].at <= now - self.window:
            sent.popleft()
        return sent

    def _refusal(self, sent: deque[_Sent], now: float, used: str, limit: str, setting: str,
                 lead: str = "this client spent") -> QuotaExceededError:
        wait = max(1.0, (sent[0].at + self.window - now) if sent else self.window)
        return QuotaExceededError(
            f"Upload budget: {lead} its upload budget; it sent {used} to the web UI in the last "
            f"{self.window:g} s and the limit is {limit} ({setting} per --upload-window). Retry in "
            f"{math.ceil(wait)} s.", code="upload_budget_exceeded", retry_after=wait)

    # ------------------------------------------------------------------ ownership and lifetime
    def record(self, client: str, paths: list[str]) -> None:
        now = self._clock()
        with self._lock:
            for path in paths:
                upload = self._uploads.setdefault(path, _Upload())
                upload.expires[client] = max(upload.expires.get(client, 0.0), now + self.ttl)

    def owns(self, client: str, path: str) -> bool:
        """The client uploaded this exact path, its hold has not ended, and the file is still there."""
        with self._lock:
            upload = self._uploads.get(path)
            held = upload is not None and upload.expires.get(client, 0.0) > self._clock()
        return held and os.path.isfile(path)

    def claim(self, client: str, path: str) -> None:
        """An event of the client's uses the file: it is kept `ttl` from now (once per client)."""
        with self._lock:
            upload = self._uploads.get(path)
            if upload is not None and client in upload.expires and client not in upload.claimed:
                upload.claimed.add(client)
                upload.expires[client] = max(upload.expires[client], self._clock() + self.ttl)

    def forget(self, client: str, paths: list[str]) -> list[str]:
        """Drop the client's hold on these paths; returns those nobody holds any more."""
        with self._lock:
            free = []
            for path in paths:
                upload = self._uploads.get(path)
                if upload is not None:
                    upload.expires.pop(client, None)
                    if not upload.expires:
                        del self._uploads[path]
                        free.append(path)
            return free

    def expired(self) -> list[str]:
        """Paths whose every hold has ended (they leave the ledger now; the caller deletes them)."""
        now = self._clock()
        with self._lock:
            for client in [c for c, sent in self._sent.items() if not self._recent(c, now)]:
                del self._sent[client]
            gone = [p for p, u in self._uploads.items() if max(u.expires.values(), default=0.0) <= now
                    or not os.path.exists(p)]
            for path in gone:
                del self._uploads[path]
            return gone

    def known(self, path: str) -> bool:
        """Somebody uploaded this path and holds it still."""
        with self._lock:
            return path in self._uploads


def delete_upload(path: str, folder: Path) -> bool:
    """Delete an uploaded file (and its folder, once empty). Only inside Gradio's upload folder."""
    target = Path(os.path.abspath(path))
    if target == folder or not target.is_relative_to(folder):
        return False
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    with contextlib.suppress(OSError):  # not empty: another file of the same content hash lives there
        if target.parent != folder:
            target.parent.rmdir()
    return True


def stray_partials(folder: Path, older_than: float) -> list[Path]:
    """Partial files an aborted upload left in the folder (Gradio writes each part to a `tmp*` file
    there and removes it only on its own errors, not when the client goes away) that have not
    grown for `older_than` seconds."""
    cutoff = time.time() - older_than
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):
                if entry.name.startswith("tmp") and entry.is_file(follow_symlinks=False) and \
                        entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    found.append(Path(entry.path))
    return found
