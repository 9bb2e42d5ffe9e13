"""Each request field every router shares, declared once (type, bounds, description), as
llama-cpp-python's `server/types.py` does. The OpenAI, TGI, batch and session routers build their
bodies from these (batch and sessions share a whole `params` object, `SamplingParams`), so a
new parameter or a changed bound is one edit here (and one in `llm_pool.params`, which checks the
same bounds again and never trusts that this ran).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from llm_pool import Finished
from llm_pool.errors import InvalidParamsError
from llm_pool.params import MAX_NEW_TOKENS_LIMIT, MAX_SEED, MAX_STOP_SEQUENCES

MaxTokens = Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Most tokens to generate.")]
Temperature = Annotated[float | None, Field(ge=0, le=2, description="0 = greedy. Default 0.7.")]
TopP = Annotated[float | None, Field(gt=0, le=1, description="Nucleus sampling: keep the most likely tokens "
                                     "whose probabilities add up to top_p.")]
TopK = Annotated[int | None, Field(ge=0, le=1_000_000, description="Keep the k most likely tokens; 0 = off.")]
MinP = Annotated[float | None, Field(ge=0, le=1, description="Drop tokens less likely than min_p x the most "
                                     "likely one; 0 = off.")]
RepetitionPenalty = Annotated[float | None, Field(gt=0, le=10, description="Divides the logits of tokens "
                                                  "already in the prompt or answer (1 = off).")]
PresencePenalty = Annotated[float | None, Field(ge=-2, le=2, description="Lowers a token's logit by this much "
                                                "once it was generated.")]
FrequencyPenalty = Annotated[float | None, Field(ge=-2, le=2, description="Lowers a token's logit by this much "
                                                 "per time it was generated.")]
LogitBias = Annotated[dict[str, float] | None, Field(description="Token id -> bias in [-100, 100], added to "
                                                     "its logit (-100 bans it, 100 forces it).")]
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Reproduces a sampled answer.")]
StopList = Annotated[list[str] | None, Field(max_length=MAX_STOP_SEQUENCES, description="Up to 16 stop "
                                             "sequences.")]
StopText = Annotated[str | list[str] | None, Field(description="Up to 16 stop sequences.")]
ModelRef = Annotated[str | None, Field(max_length=200, description="Model name (or name@version); default: the "
                                       "server's default model.")]
KeepAlive = Annotated[str | float | None, Field(description="Ollama's meaning: how long the model stays loaded "
                                               "once idle (300, '5m', 0, -1 = until evicted); admins only.")]


class SamplingParams(BaseModel):
    """The `params` object of the batch and session bodies: how to sample, and nothing else.
    Unknown fields are refused. A subclass may rename the token limit with an alias (batch calls it
    `max_tokens`, as OpenAI does) and keeps its place first in the schema."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = None
    presence_penalty: PresencePenalty = None
    frequency_penalty: FrequencyPenalty = None
    logit_bias: LogitBias = None
    seed: Seed = None
    stop: StopList = None

    def values(self) -> dict[str, Any]:
        """The sampling fields that were set, by `GenerationParams`' names (a subclass's other fields,
        such as a request's model or stream, are not among them)."""
        return self.model_dump(include=set(SamplingParams.model_fields), exclude_none=True)


# ------------------------------------------------------------------ response parts
def usage_dict(finished: Finished) -> dict:
    usage = finished.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens,
                                      "cached_tokens_from_disk": usage.disk_tokens}}


def timings(final: Finished) -> dict:
    """Shoal extension (like llama.cpp's): where the time went."""
    return {"ttft_s": round(final.ttft, 4) if final.ttft is not None else None,
            "duration_s": round(final.duration, 4), "queued_s": round(final.queued, 4),
            "tokens_per_second": round(final.tokens_per_second, 2)}


def refused(field: str, why: str) -> InvalidParamsError:
    """A field the client sent that Shoal does not do: a 400 that names it."""
    return InvalidParamsError(f"{field}: {why}", param=field)


def screened(data: Any, ignored: frozenset[str], not_supported: Mapping[str, str],
             asks_nothing: Callable[[str, Any], bool]) -> Any:
    """A request body before validation: fields that change nothing about the answer dropped,
    known unsupported ones refused by name unless their value asks for nothing."""
    if not isinstance(data, dict):
        return data
    for field, why in not_supported.items():
        if field in data and not asks_nothing(field, data[field]):
            raise refused(field, why)
    return {k: v for k, v in data.items() if k not in ignored and k not in not_supported}
