"""Versions of a chat's messages: what an edit or a regenerate replaced is kept, not lost.

A chat is one list of messages, the branch the user has chosen: it is all the model is ever
shown. Where an edit or a regenerate replaced the messages from position k on, the chat has a
*fork* at k: its versions are the alternative tails (the messages from k on, each with the forks
inside it). The chosen version's tail is the chat's list itself (its slot holds None); the others
are kept whole, so choosing one again brings back its messages and its own deeper forks.

Pure functions on the stored JSON (`messages`: list of message dicts; `forks`: {str(k): {"selected":
int, "versions": [tail or None]}}), used by the store inside its transactions.
"""

from __future__ import annotations

from typing import Any

MAX_VERSIONS = 20  # per fork: the oldest version not chosen goes first

Forks = dict[str, dict[str, Any]]


def fork(messages: list[dict], forks: Forks, at: int, new: list[dict]) -> tuple[list[dict], Forks]:
    """The messages from `at` on replaced by `new`; what was there becomes a version at `at`. A
    turn that starts with the very message it replaces (a regenerate) makes versions of the reply:
    the fork is after that message, so edits of a message and regenerates of its reply stay apart."""
    if (new and at < len(messages) and new[0]["role"] == "user" == messages[at]["role"]
            and new[0]["content"] == messages[at]["content"]):
        at, new = at + 1, new[1:]
    tail = messages[at:]
    if not tail:
        return messages + new, forks
    kept, deeper = _split(forks, at)
    entry = kept.get(str(at)) or {"selected": 0, "versions": [None]}
    versions = list(entry["versions"])
    versions[entry["selected"]] = {"messages": tail, "forks": deeper}
    versions.append(None)
    while len(versions) > MAX_VERSIONS:
        versions.pop(0)  # the oldest (never the new one: it is last)
    kept[str(at)] = {"selected": len(versions) - 1, "versions": versions}
    return messages[:at] + new, kept


def select(messages: list[dict], forks: Forks, at: int, version: int) -> tuple[list[dict], Forks]:
    """The chat continues with version `version` (0-based) of the fork at `at`."""
    entry = forks.get(str(at))
    if entry is None:
        raise LookupError(f"message {at} has no other versions")
    versions = list(entry["versions"])
    if not 0 <= version < len(versions):
        raise IndexError(f"message {at} has versions 0 to {len(versions) - 1}")
    if version == entry["selected"]:
        return messages, forks
    kept, deeper = _split(forks, at)
    versions[entry["selected"]] = {"messages": messages[at:], "forks": deeper}
    chosen = versions[version]
    versions[version] = None
    kept[str(at)] = {"selected": version, "versions": versions}
    return messages[:at] + chosen["messages"], {**kept, **chosen["forks"]}


def cut(forks: Forks, start: int, end: int) -> Forks:
    """The forks once messages[start:end] are deleted: those inside (or at `start`, whose versions
    replaced what is deleted) go with them; those after move up."""
    removed = end - start
    out: Forks = {}
    for key, entry in forks.items():
        at = int(key)
        if at < start:
            out[key] = entry
        elif at >= end and at > start:
            out[str(at - removed)] = entry
    return out


def marks(forks: Forks) -> dict[int, tuple[int, int]]:
    """{position: (selected version, number of versions)} of each fork of the chosen branch."""
    return {int(k): (v["selected"], len(v["versions"])) for k, v in forks.items()}


def listed(messages: list[dict], forks: Forks, at: int) -> list[dict[str, Any]]:
    """The versions of the fork at `at`: each one's messages (from `at` on), the chosen one marked."""
    entry = forks.get(str(at))
    if entry is None:
        raise LookupError(f"message {at} has no other versions")
    return [{"version": i, "selected": i == entry["selected"],
             "messages": messages[at:] if tail is None else tail["messages"]}
            for i, tail in enumerate(entry["versions"])]


def _split(forks: Forks, at: int) -> tuple[Forks, Forks]:
    """(forks at or before `at`, forks after it: those belong to the tail from `at`)."""
    kept = {k: v for k, v in forks.items() if int(k) <= at}
    return kept, {k: v for k, v in forks.items() if int(k) > at}
