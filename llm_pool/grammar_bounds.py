"""Bounds on the work one structured-output request may cause, checked before any engine sees it.

A grammar is enforced at every generated token, inside the engine's batch step, so a costly one
slows every stream sharing the model, not only its own. What makes grammars costly, as measured
on llama.cpp (which turns a JSON schema into its own GBNF grammar, expanding `x{n}` into n copies,
and keeps one parse stack per way the text so far can be read):

- alternatives alive at once ("width"): `^(a?){300}a{300}$` can be read in ~300 ways after each
  `a`, so every token is checked ~300 times over the whole vocabulary, and each check walks the
  chain of optional copies again (a neighbour's stream: 0.12 s between tokens with width 40, 0.8 s
  with width 80, minutes with 300). A repeated part of varying length (`(a|aa){80}`) spreads the
  same way; a repeated part that can be empty and is repeated without bound (`(a?)*`) never ends;
- expanded size: nested counts multiply (`(a{100}){100}` is 10,000 copies);
- depth: a schema nested hundreds of levels deep overflows the validators' recursion (a 500).

`check_schema` and `check_pattern` refuse such input with a 400 (`GrammarBoundError`) naming the bound;
a schema's size in bytes is bounded by `constraints.MAX_SCHEMA_BYTES`. Patterns are read with
Python's regular-expression parser (JSON Schema patterns are ECMA-262, whose common part it reads
alike). Everything here is linear in the input and runs in milliseconds.
"""

from __future__ import annotations

import re
import re._constants as sre
import re._parser as sre_parse
from dataclasses import dataclass
from typing import Any

from .errors import InvalidParamsError, InvalidRequestError

MAX_SCHEMA_DEPTH = 32  # nested JSON objects/arrays in one schema
MAX_PATTERN_WIDTH = 64  # ways a pattern may read a text at once (llama.cpp's parse stacks)
MAX_PATTERN_SIZE = 5000  # pattern elements once counted repetitions are expanded
MAX_REPEAT = 1000  # largest count in x{n,m}, and in minLength/maxLength/minItems/maxItems...
MAX_PATTERN_NESTING = 32  # nested groups in a pattern
MAX_ALTERNATIVES = 256  # values of one enum, branches of one anyOf/oneOf
MAX_CONSTRAINED_TOOLS = 32  # tools a constrained call (tool_choice required) may choose from
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")
_DATA = ("enum", "const", "default", "examples")  # values, not schemas: no patterns in there
_UNBOUNDED = 10**9
_PROPERTY = re.compile(r"((?:^|[^\\])(?:\\\\)*)\\[pP](?:\{[^}]*\}|[A-Za-z])")


class GrammarBoundError(InvalidRequestError):
    """A schema or pattern past a bound of this module (400)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="grammar_too_costly")


@dataclass(frozen=True)
class _Cost:
    low: int  # shortest match
    high: int  # longest match (_UNBOUNDED: no bound)
    entry: int  # ways to begin (parse stacks before the first character)
    width: int  # most ways alive at once inside
    size: int  # elements once repetitions are expanded


def check_schema(schema: Any, param: str) -> None:
    """Depth, alternatives, counts and the patterns of a JSON schema (iteratively: a deep schema
    must not overflow the checker either)."""
    stack: list[tuple[Any, int, bool]] = [(schema, 1, True)]
    while stack:
        node, depth, is_schema = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarBoundError(f"{param}: the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep "
                                     f"(the limit is {MAX_SCHEMA_DEPTH})", param=param)
        if isinstance(node, list):
            stack.extend((item, depth + 1, is_schema) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        if is_schema:
            _check_keywords(node, param)
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1, is_schema and key not in _DATA))


def _check_keywords(node: dict, param: str) -> None:
    for key in ("enum", "anyOf", "oneOf"):
        value = node.get(key)
        if isinstance(value, list) and len(value) > MAX_ALTERNATIVES:
            raise GrammarBoundError(f"{param}: {key} has {len(value)} entries; the limit is {MAX_ALTERNATIVES}",
                                     param=param)
    for key in _COUNTS:
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_REPEAT:
            raise GrammarBoundError(f"{param}: {key} {value:g} is over {MAX_REPEAT}, the largest count a "
                                     "grammar may repeat", param=param)
    if isinstance(node.get("pattern"), str):
        check_pattern(node["pattern"], f"{param}: pattern", param)
    if isinstance(node.get("patternProperties"), dict):
        for pattern in node["patternProperties"]:
            check_pattern(pattern, f"{param}: patternProperties", param)


def check_pattern(pattern: str, where: str, param: str) -> None:
    """Refuse a regular expression whose grammar would be too wide or too large to enforce."""
    if _nesting(pattern) > MAX_PATTERN_NESTING:
        raise GrammarBoundError(f"{where} nests groups more than {MAX_PATTERN_NESTING} deep", param=param)
    try:  # a Unicode property (\\p{L}, which Python's parser lacks) is one character class
        parsed = sre_parse.parse(_PROPERTY.sub(r"\1x", pattern))
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidParamsError(f"{where} is not a regular expression Shoal can read ({exc})", param=param) from None
    cost = _sequence(list(parsed), where, param)
    if cost.size > MAX_PATTERN_SIZE:
        raise GrammarBoundError(f"{where} expands to {cost.size} elements once its counted repetitions are "
                                 f"written out; the limit is {MAX_PATTERN_SIZE}", param=param)
    if cost.width > MAX_PATTERN_WIDTH:
        raise GrammarBoundError(f"{where} can read a text in about {cost.width} ways at once (a repeated optional "
                                 f"part such as (a?){{300}}, or a repeated part of varying length); the limit is "
                                 f"{MAX_PATTERN_WIDTH}, so that checking it at each token stays cheap", param=param)


def _nesting(pattern: str) -> int:
    depth = deepest = 0
    escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(0, depth - 1)
    return deepest


def _sequence(items: list, where: str, param: str) -> _Cost:
    costs = [_node(op, arg, where, param) for op, arg in items]
    if not costs:
        return _Cost(0, 0, 0, 0, 0)
    # follow[i]: the ways to go on right after item i (through the optional items that follow it)
    follow = [0] * len(costs)
    for i in range(len(costs) - 2, -1, -1):
        after = costs[i + 1]
        follow[i] = after.entry + (follow[i + 1] if after.low == 0 else 0)
    entry = 0
    for cost in costs:
        entry += cost.entry
        if cost.low > 0:
            break
    width = max([entry] + [c.width + f for c, f in zip(costs, follow)])
    return _Cost(sum(c.low for c in costs), min(_UNBOUNDED, sum(c.high for c in costs)), entry, width,
                 sum(c.size for c in costs))


def _node(op, arg, where: str, param: str) -> _Cost:
    if op in (sre.LITERAL, sre.NOT_LITERAL, sre.IN, sre.ANY, sre.CATEGORY):
        return _Cost(1, 1, 1, 1, 1)
    if op is sre.AT:
        return _Cost(0, 0, 0, 0, 0)
    if op is sre.SUBPATTERN:
        return _sequence(list(arg[-1]), where, param)
    if op is sre.BRANCH:
        branches = [_sequence(list(b), where, param) for b in arg[1]]
        return _Cost(min(b.low for b in branches), max(b.high for b in branches), sum(b.entry for b in branches),
                     sum(b.width for b in branches), sum(b.size for b in branches))
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
        low, high, body = arg
        return _repeat(low, high, _sequence(list(body), where, param), where, param)
    if op is sre.ATOMIC_GROUP:
        return _sequence(list(arg), where, param)
    # look-arounds, back-references: the grammar engine refuses them; count them as one element
    return _Cost(0, _UNBOUNDED, 1, 1, 1)


def _repeat(low: int, high: int, body: _Cost, where: str, param: str) -> _Cost:
    unbounded = high == sre.MAXREPEAT
    if max(low, 0 if unbounded else high) > MAX_REPEAT:
        raise GrammarBoundError(f"{where} repeats a part {max(low, high if not unbounded else 0)} times; the "
                                 f"limit is {MAX_REPEAT}", param=param)
    span = (low, _UNBOUNDED if unbounded else min(_UNBOUNDED, high * body.high))
    if high == 0:
        return _Cost(0, 0, 0, 0, 0)
    if unbounded:
        if body.low == 0:
            raise GrammarBoundError(f"{where} repeats without bound a part that can match nothing (as in (a?)*); "
                                     "write the part so that it matches at least one character", param=param)
        return _Cost(low * body.low, span[1], body.entry, body.width + body.entry, (low + 1) * body.size)
    size = high * body.size
    if high == 1:
        return _Cost(low * body.low, body.high, body.entry, body.width, size)
    if body.low == 0:  # copies that may each be skipped: every one of them is a way to go on
        return _Cost(0, span[1], high * body.entry, high * max(body.width, body.entry), size)
    if body.low == body.high:  # fixed length: only one copy is being read at a time
        width = body.width + body.entry
    else:  # varying length: the same text can end in many different copies
        width = high * body.width
    return _Cost(low * body.low, span[1], body.entry, width, size)
