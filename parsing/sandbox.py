"""Parsing in a separate process, under a time and a memory bound.

A hostile file (a PDF whose objects loop, a decompression bomb) may make a parser spin or grow
without end; here it can only exhaust its own short-lived process, which is killed when its time
is up. The server and its other users do not notice.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from .base import Document, ParseError
from .registry import parse_file

RUN_SLICE = 0.1  # seconds a paused parse runs between pauses while chats generate


@dataclass(frozen=True)
class ParseLimits:
    seconds: float = 60.0
    memory_bytes: int = 2 * 2**30  # address space of the parsing process
    niceness: int = 10  # parsing is background work: running chats come first


def _worker(conn, filename: str, data: bytes, memory_bytes: int, niceness: int = 0) -> None:
    with contextlib.suppress(ValueError, OSError):  # an unlimited or lower hard limit stays
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    with contextlib.suppress(OSError):
        os.nice(niceness)
    try:
        conn.send(("ok", parse_file(filename, data).to_dict()))
    except ParseError as exc:
        conn.send(("error", exc.reason))
    except MemoryError:
        conn.send(("error", "reading this file needed more memory than allowed; it was stopped"))
    except RecursionError:
        conn.send(("error", "the file's structure nests too deeply to read (a hostile file?)"))
    except Exception as exc:  # any parser failure is the file's problem, reported in words
        conn.send(("error", f"the file cannot be read ({type(exc).__name__}: {str(exc)[:200]})"))
    finally:
        conn.close()


def parse_isolated(filename: str, data: bytes, limits: ParseLimits = ParseLimits(),
                   busy: Callable[[], bool] | None = None, yield_seconds: float = 1.0) -> Document:
    """Parse in a child process. With `busy` (are chats generating?), the child is paused while it
    says so, running one `RUN_SLICE` per `yield_seconds` (on two cores even a niced process stalls
    llama.cpp's threads); the time limit counts only the time the child was let run."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker, args=(sender, filename, data, limits.memory_bytes, limits.niceness),
                              daemon=True)
    process.start()
    sender.close()
    try:
        ran = 0.0
        while True:
            began = time.monotonic()
            if receiver.poll(min(RUN_SLICE, max(0.0, limits.seconds - ran))):
                break
            ran += time.monotonic() - began
            if ran >= limits.seconds:
                raise ParseError(f"reading this file took longer than {limits.seconds:.0f} s; it was stopped "
                                 "(a hostile or very complex file?)")
            if busy is not None and busy():
                _pause_while(process, busy, yield_seconds - RUN_SLICE)
        try:
            status, payload = receiver.recv()
        except EOFError:
            raise ParseError("the parser stopped without an answer (out of memory?); the file was refused") from None
    finally:
        receiver.close()
        if process.is_alive():
            process.kill()
        process.join(5)
    if status == "error":
        raise ParseError(payload)
    return Document.from_dict(payload)


def _pause_while(process, busy: Callable[[], bool], seconds: float) -> None:
    """Stop the child (SIGSTOP) for up to `seconds` while `busy()` holds, then let it go on."""
    try:
        os.kill(process.pid, signal.SIGSTOP)
    except (OSError, TypeError):
        return
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and busy():
            time.sleep(0.05)
    finally:
        with contextlib.suppress(OSError):  # it ended meanwhile
            os.kill(process.pid, signal.SIGCONT)
