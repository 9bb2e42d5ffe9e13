"""Per-user quotas: what one user may keep on the server and how fast they may add to it.

Sessions per user, messages per session, the size of a session's system prompt, uploaded files
and their bytes per user (over all of that user's sessions), uploads per minute, and the free
space an upload must leave on the data dir's disk. Every refusal is a typed error whose message names the limit
and the setting that changes it: counts are 429 (`QuotaExceededError`), sizes 413, a full disk
507 (`InsufficientStorageError`). A limit of 0 means no limit. `ChatService` and
`DocumentService` ask these before they write, so REST, the web UI, `gradio_client` and the
WebSocket meet the same limits. Knows nothing about HTTP or Gradio.
"""

from __future__ import annotations

import errno
import math
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from llm_pool.errors import InsufficientStorageError, PayloadTooLargeError, QuotaExceededError

MB = 1_000_000


@dataclass
class Quotas:
    sessions_per_user: int = 0
    messages_per_session: int = 0
    system_prompt_chars: int = 0
    files_per_user: int = 0
    stored_bytes_per_user: int = 0
    uploads_per_minute: float = 0
    min_free_disk_bytes: int = 0
    clock: object = time.monotonic
    shared: object = field(default=None, repr=False)  # a limits.RedisBuckets: uploads counted in Redis
    _uploads: dict[str, deque] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings, shared=None) -> Quotas:
        """`shared`: a `limits.RedisBuckets` (with --redis-url) to count uploads per minute in, for
        every replica on that Redis; None: this process counts its own."""
        return cls(sessions_per_user=settings.max_sessions_per_user,
                   messages_per_session=settings.max_messages_per_session,
                   system_prompt_chars=settings.max_system_prompt_chars,
                   files_per_user=settings.max_files_per_user,
                   stored_bytes_per_user=int(settings.max_stored_mb_per_user * MB),
                   uploads_per_minute=settings.max_uploads_per_minute,
                   min_free_disk_bytes=int(settings.min_free_disk_mb * MB), shared=shared)

    # ------------------------------------------------------------------ sessions and messages
    def check_system_prompt(self, text: str | None) -> None:
        limit = self.system_prompt_chars
        if limit and text and len(text) > limit:
            raise PayloadTooLargeError(f"system_prompt has {len(text)} characters; the limit is {limit} "
                                       "(--max-system-prompt-chars)", param="system_prompt",
                                       code="system_prompt_too_large")

    def check_new_session(self, sessions: int) -> None:
        """`sessions`: how many the user has now."""
        limit = self.sessions_per_user
        if limit and sessions >= limit:
            raise QuotaExceededError(f"you have {sessions} chat sessions; the limit is {limit} per user "
                                     "(--max-sessions-per-user). Delete old sessions to start new ones.",
                                     code="too_many_sessions")

    def check_messages(self, messages: int) -> None:
        """`messages`: how many the session will hold once the new turn is stored."""
        limit = self.messages_per_session
        if limit and messages > limit:
            raise QuotaExceededError(f"this session would hold {messages} messages; the limit is {limit} per "
                                     "session (--max-messages-per-session). Start a new chat.",
                                     param="session_id", code="too_many_messages")

    # ------------------------------------------------------------------ files
    def admit_upload(self, user: str) -> None:
        """Take one upload from the user's per-minute allowance: a sliding minute in this process;
        with `shared` (Redis), a bucket of `uploads_per_minute` refilling over a minute, the form of
        "N per minute" every replica can share (N at once, then one per 60/N s). If Redis cannot be
        reached, uploads are admitted (fail open, as the rate limits)."""
        limit = self.uploads_per_minute
        if not limit:
            return
        if self.shared is not None:
            level = self.shared.step("uploads", str(user), limit, "take")
            if level is not None:
                wait = max(1.0, (1 - min(level, 1.0)) * 60 / limit)
                raise QuotaExceededError(f"{math.ceil(limit)} uploads in the last minute; the limit is {limit:g} per "
                                         f"minute per user (--max-uploads-per-minute); retry in {wait:.0f} s.",
                                         param="file", code="too_many_uploads", retry_after=wait)
            return
        now = self.clock()
        with self._lock:
            recent = self._uploads.setdefault(user, deque())
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= limit:
                wait = max(1.0, recent[0] + 60 - now)
                raise QuotaExceededError(f"{len(recent)} uploads in the last minute; the limit is {limit:g} per "
                                         f"minute per user (--max-uploads-per-minute); retry in {wait:.0f} s.",
                                         param="file", code="too_many_uploads", retry_after=wait)
            recent.append(now)
            if len(self._uploads) > 100_000:  # forget users with no upload in the last minute
                for key in [k for k, q in self._uploads.items() if not q or q[-1] <= now - 60]:
                    del self._uploads[key]

    def check_files(self, files: int, stored: int, size: int) -> None:
        """`files`, `stored`: what the user keeps now; `size`: the new file's bytes."""
        if self.files_per_user and files >= self.files_per_user:
            raise QuotaExceededError(f"you keep {files} files; the limit is {self.files_per_user} per user "
                                     "(--max-files-per-user). Remove files or sessions to add more.",
                                     param="file", code="too_many_files")
        limit = self.stored_bytes_per_user
        if limit and stored + size > limit:
            raise PayloadTooLargeError(f"your files would take {(stored + size) / MB:.1f} MB; the limit is "
                                       f"{limit / MB:g} MB per user (--max-stored-mb-per-user). Remove files "
                                       "or sessions to add more.", param="file", code="storage_quota_exceeded")

    # ------------------------------------------------------------------ the disk
    def check_disk(self, folder: Path, size: int = 0) -> None:
        """Refuse (507) a write of `size` bytes that would leave less than the floor free."""
        if not self.min_free_disk_bytes:
            return
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return  # cannot tell: the write itself reports a full disk
        if free - size < self.min_free_disk_bytes:
            raise InsufficientStorageError(
                f"the server's disk is nearly full ({free / MB:.0f} MB free; Shoal keeps "
                f"{self.min_free_disk_bytes / MB:g} MB free, --min-free-disk-mb); the file was not stored. Chats go "
                "on.", code="insufficient_storage")


def disk_full(exc: OSError) -> InsufficientStorageError | None:
    """The 507 for a write the disk refused for want of space (ENOSPC, EDQUOT); None for other errors."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return InsufficientStorageError("the server's disk is full; the file was not stored (nothing of it was "
                                    "kept). Chats go on.", code="insufficient_storage")
