"""Parsing in a separate process, under a time and a memory bound.

A hostile file (a PDF whose objects loop, a decompression bomb) may make a parser spin or grow
without end; here it can only exhaust its own short-lived process, which is killed when its time
is up. The server and its other users do not notice.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from dataclasses import dataclass

from .base import Document, ParseError
from .registry import parse_file


@dataclass(frozen=True)
class ParseLimits:
    seconds: float = 60.0
    memory_bytes: int = 2 * 2**30  # address space of the parsing process
    niceness: int = 10  # parsing is background work: running chats come first


def _worker(conn, filename: str, data: bytes, memory_bytes: int, niceness: int = 0) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ValueError, OSError):
        pass
    try:
        os.nice(niceness)
    except OSError:
        pass
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


def parse_isolated(filename: str, data: bytes, limits: ParseLimits = ParseLimits()) -> Document:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker, args=(sender, filename, data, limits.memory_bytes, limits.niceness),
                              daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(limits.seconds):
            raise ParseError(f"reading this file took longer than {limits.seconds:.0f} s; it was stopped "
                             "(a hostile or very complex file?)")
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
