"""Structured output: what the generated text must be, and how each engine enforces it.

An `OutputFormat` says "JSON (any object, or valid against this JSON schema)", "a match of this
regular expression" or "a sentence of this GBNF grammar" (llama.cpp's `grammar`). It is checked
when the request arrives (a bad schema, pattern or grammar is a 400 naming the field it came
from), and each engine enforces it while decoding, never by checking afterwards:

- the transformers engine masks, at every step, the tokens the grammar does not allow
  (`TokenConstraint`, built on llguidance, the grammar engine llama.cpp and vLLM also use);
- the llama.cpp engine passes the JSON schema (or the GBNF grammar) to the server, which turns it
  into its own grammar; a GBNF grammar is read by llguidance first (`gbnf_to_lark`), so a broken
  one is a 400 on both engines.

JSON is generated compactly (no free whitespace): a small model left to choose whitespace can
spend its whole budget on newlines.

A grammar is enforced inside the engine's batch step, so its cost is every user's: schemas and
patterns past the bounds of `grammar_bounds` (depth, alternatives, counts, a pattern's width and
expanded size) are refused when the request arrives, a GBNF grammar is bounded in size
(`MAX_GRAMMAR_BYTES`), and compiling the grammar (`check`) has a time budget.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from .errors import InvalidParamsError, InvalidRequestError
from .grammar_bounds import check_pattern, check_schema

MAX_SCHEMA_BYTES = 64 * 1024
MAX_PATTERN_LENGTH = 4096
MAX_GRAMMAR_BYTES = 32 * 1024  # a GBNF grammar (llama.cpp's `grammar`)
COMPILE_SECONDS = 2.0  # a grammar that takes longer to compile is refused (it would stall its engine)
_compiler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-check")
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class OutputFormat:
    kind: str  # "json" | "regex" | "gbnf"
    schema_text: str | None = None  # json: the schema as JSON text; None = any JSON object
    pattern: str | None = None  # regex
    gbnf_text: str | None = None  # gbnf: llama.cpp's grammar format
    param: str = "response_format"  # the request field it came from, for error messages

    @property
    def schema(self) -> dict[str, Any]:
        return json.loads(self.schema_text) if self.schema_text else ANY_OBJECT

    @classmethod
    def json(cls, schema: dict[str, Any] | None = None, param: str = "response_format") -> OutputFormat:
        if schema is None:
            return cls("json", None, param=param)
        if not isinstance(schema, dict):
            raise InvalidParamsError(f"{param}: the JSON schema must be an object", param=param)
        text = json.dumps(schema, separators=(",", ":"))  # key order kept: it is the output's order
        if len(text) > MAX_SCHEMA_BYTES:
            raise InvalidParamsError(f"{param}: the JSON schema is over {MAX_SCHEMA_BYTES // 1024} KB", param=param)
        check_schema(schema, param)  # first: bounded depth before anything recursive reads it
        _check_schema(schema, param)
        return cls("json", text, param=param)

    @classmethod
    def regex(cls, pattern: str, param: str = "grammar") -> OutputFormat:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidParamsError(f"{param}: the regular expression must be a non-empty string", param=param)
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise InvalidParamsError(f"{param}: the regular expression is over {MAX_PATTERN_LENGTH} "
                                     "characters", param=param)
        check_pattern(pattern, param, param)
        return cls("regex", pattern=pattern, param=param)

    @classmethod
    def gbnf(cls, text: str, param: str = "grammar") -> OutputFormat:
        """llama.cpp's GBNF (`root ::= "yes" | "no"`); it is read and compiled by `check`."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidParamsError(f"{param}: the grammar must be a non-empty GBNF text", param=param)
        if len(text.encode()) > MAX_GRAMMAR_BYTES:
            raise InvalidParamsError(f"{param}: the grammar is over {MAX_GRAMMAR_BYTES // 1024} KB", param=param)
        return cls("gbnf", gbnf_text=text, param=param)

    def grammar(self) -> str:
        """The grammar in llguidance's format (raises ValueError for GBNF it cannot read)."""
        from llguidance import LLMatcher
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.pattern or "")
        if self.kind == "gbnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark
            try:
                return LLMatcher.grammar_from_lark(gbnf_to_lark(self.gbnf_text or ""))
            except Exception as exc:  # the converter raises plain Exceptions ("Rule 'x' not found")
                raise ValueError(f"not a valid GBNF grammar ({exc})") from None
        return LLMatcher.grammar_from_json_schema(self.schema_text or json.dumps(ANY_OBJECT),
                                                  overrides=_COMPACT)

    def check(self, seconds: float = COMPILE_SECONDS) -> None:
        """Compile the grammar once without a tokenizer: unsupported schema keywords and invalid
        regular expressions are the caller's error, found before anything is queued; a grammar that
        takes over `seconds` to compile is refused too. (Backends call it in `submit`, off the event
        loop.)"""
        future = _compiler.submit(self._problem)
        try:
            problem = future.result(timeout=seconds)
        except FutureTimeout:  # the compile runs on (bounded by llguidance's own limits) and is dropped
            raise InvalidParamsError(f"{self.param}: the grammar takes over {seconds:g} s to compile; simplify "
                                     "the schema", param=self.param) from None
        if problem:
            raise InvalidParamsError(f"{self.param}: {_short(problem)}", param=self.param)

    def _problem(self) -> str:
        from llguidance import LLMatcher
        try:
            return LLMatcher.validate_grammar(self.grammar())
        except ValueError as exc:
            return str(exc)

    def validate(self, text: str) -> bool:
        """Does `text` satisfy this format? (For tests and clients; engines never need it.)"""
        if self.kind == "regex":
            import re
            return re.fullmatch(self.pattern or "", text) is not None
        if self.kind == "gbnf":
            raise ValueError("validate: GBNF grammars are enforced while decoding, not checked here")
        try:
            value = json.loads(text)
        except ValueError:
            return False
        import jsonschema
        return jsonschema.validators.validator_for(self.schema)(self.schema).is_valid(value)


def _check_schema(schema: dict[str, Any], param: str) -> None:
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidParamsError(f"{param}: not a valid JSON schema ({_short(exc.message)})", param=param) from None


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= 300 else message[:297] + "..."


class TokenizerGrammar:
    """llguidance's view of one model's tokenizer, for grammars and token bytes (about a second to
    build, on first use: once per loaded model)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: set[int]):
        self._source = (hf_tokenizer, vocab_size, sorted(eos_ids))
        self._tokenizer = None
        self._unsupported: str | None = None  # why llguidance cannot read this tokenizer
        self._lock = threading.Lock()

    def _ll(self):
        with self._lock:
            if self._tokenizer is None and self._unsupported is None:
                import llguidance.hf
                tokenizer, vocab, eos = self._source
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
                except Exception as exc:  # e.g. a tokenizer with no decoder llguidance knows
                    self._unsupported = _short(str(exc))
            return self._tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        """One token's exact bytes (a character may be split across tokens); for a tokenizer
        llguidance cannot read, the token's decoded text."""
        ll = self._ll()
        if ll is None:
            return self._source[0].decode([token_id]).encode("utf-8", errors="replace")
        return bytes(ll.decode_bytes([token_id]))

    def constraint(self, output: OutputFormat) -> TokenConstraint:
        from llguidance import LLMatcher
        ll = self._ll()
        if ll is None:
            raise InvalidRequestError(f"{output.param}: structured output is not available for this model: its "
                                      f"tokenizer is not one the grammar engine reads ({self._unsupported})",
                                      param=output.param)
        matcher = LLMatcher(ll, output.grammar(), log_level=0)
        if matcher.is_error():
            raise InvalidParamsError(f"{output.param}: {_short(matcher.get_error())}", param=output.param)
        return TokenConstraint(matcher, self._source[1])


class TokenConstraint:
    """One request's grammar state in the transformers engine: which tokens may come next."""

    def __init__(self, matcher: Any, vocab_size: int):
        import torch
        self._matcher = matcher
        self._mask = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)  # llguidance writes it

    def restrict(self, logits):
        """logits: [vocab] of one row (any device); returns a copy where disallowed tokens are -inf.
        The bitmask is unpacked here rather than with llguidance.torch's helper, which is
        torch.compile'd (a compile on the engine thread at first use) and wants both on one device."""
        import numpy as np
        import torch
        self._matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self._mask.numel() * 4)
        allowed = np.unpackbits(self._mask.numpy().view(np.uint8), bitorder="little")  # bit i: token i
        blocked = torch.ones(logits.shape[-1], dtype=torch.bool)
        n = min(blocked.shape[0], allowed.shape[0])
        blocked[:n] = torch.from_numpy(allowed[:n] == 0)
        return logits.float().masked_fill(blocked.to(logits.device, non_blocking=True), float("-inf"))

    def consume(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def failed(self) -> str | None:
        return self._matcher.get_error() or None if self._matcher.is_error() else None


__all__ = ["OutputFormat", "TokenConstraint", "TokenizerGrammar"]
