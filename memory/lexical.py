"""Words for the lexical index: tokenising, stemming and BM25 scoring.

A term is a lowercased word, stemmed with the Snowball English stemmer, with stop words left out.
Identifiers are also split where a programmer's eye splits them (`totalPrice`, `parse_header`,
`asn1_der_coding` give `totalprice`, `total`, `price`, ...), so a question in words finds the code
that spells them joined. BM25 statistics (document frequency, average length) come from the
session's own passages only: nothing another user uploaded changes a score here.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

import snowballstemmer

K1 = 1.2
B = 0.75
MAX_TERM = 40  # longer "words" (base64, hashes) are noise and bloat the postings

_WORD = re.compile(r"[^\W_]+(?:[_'’.-][^\W_]+)*", re.UNICODE)
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_STOP = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves s t don shall may must also one use used
using us does doesn let get gets got many much
""".split())
_stemmer = snowballstemmer.stemmer("english")


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    return _stemmer.stemWord(word)


def terms(text: str) -> list[str]:
    """The index terms of `text`, in order, with repeats (term frequency counts them)."""
    out: list[str] = []
    for match in _WORD.finditer(text):
        word = match.group(0)
        pieces = [word]
        if any(ch in word for ch in "_.-'’") or (not word.islower() and not word.isupper()):
            parts = [p for chunk in re.split(r"[_.\-'’]", word) for p in _PART.findall(chunk)]
            if len(parts) > 1:
                pieces = [word.replace("'", "").replace("’", "")] + parts
        for piece in pieces:
            lowered = piece.lower()
            if len(lowered) > MAX_TERM or lowered in _STOP or (len(lowered) == 1 and not lowered.isdigit()):
                continue
            out.append(_stem(lowered))
    return out


def term_counts(text: str) -> Counter[str]:
    return Counter(terms(text))


def idf(passages: int, frequency: int) -> float:
    """BM25's inverse document frequency (the +1 keeps it positive for very common terms)."""
    return math.log(1 + (passages - frequency + 0.5) / (frequency + 0.5))


def bm25(tf: int, length: int, average_length: float, weight: float) -> float:
    norm = K1 * (1 - B + B * length / max(average_length, 1e-9))
    return weight * tf * (K1 + 1) / (tf + norm)
