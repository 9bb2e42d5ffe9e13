"""Tokenizer routes: POST /tokenize and /detokenize, in the shapes vLLM and llama.cpp's server use.

`/tokenize` takes a `prompt` (vLLM) or `content` (llama.cpp), or chat `messages` (the chat
template applied, as the model will see them, with `tools` if given), and answers `tokens`, `count` and
`max_model_len`; with `with_pieces` (llama.cpp's), each token is `{"id", "piece"}`, the piece its
text, or a list of its byte values where it is not UTF-8 on its own. `/detokenize` takes `tokens`
and answers `prompt` (vLLM) and `content` (llama.cpp). Same owner as generation: anyone with keys
off, a key holder with keys on.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from llm_pool import GenerationParams, GenerationRequest
from llm_pool.errors import InvalidParamsError

from .auth import caller_of
from .context import services_of
from .openai_api import ChatMessageIn
from .tool_calls import ToolDef, ToolPlan, history

router = APIRouter(tags=["Tokenizer"])


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200)
    prompt: str | None = Field(None, description="Text to tokenize (vLLM's field).")
    content: str | None = Field(None, description="Text to tokenize (llama.cpp's field).")
    messages: list[ChatMessageIn] | None = Field(None, min_length=1, max_length=10_000,
                                                 description="A chat, with the model's template applied.")
    tools: list[ToolDef] | None = Field(None, max_length=128, description="With messages: the tools, shown "
                                        "as a chat completion with tool_choice auto shows them.")
    add_special_tokens: bool | None = Field(None, description="Accepted when true (the default): "
                                            "the model's own special tokens are always added.")
    add_special: bool | None = Field(None, description="llama.cpp's name for add_special_tokens.")
    add_generation_prompt: bool | None = Field(None, description="With messages: open the assistant's "
                                               "turn after them (default true), as chat completions do.")
    continue_final_message: bool | None = Field(None, description="With messages: leave the last "
                                                "(assistant) message open, as chat completions do.")
    with_pieces: bool = Field(False, description="llama.cpp's: each token as {id, piece}, the piece its text "
                              "(or its byte values where they are not UTF-8 on their own).")

    def request(self) -> GenerationRequest:
        texts = [t for t in (self.prompt, self.content) if t is not None]
        if len(texts) + (self.messages is not None) != 1:
            raise InvalidParamsError("send exactly one of prompt, content or messages", param="prompt")
        for name in ("add_special_tokens", "add_special"):
            if getattr(self, name) is False:  # refused rather than ignored: the ids would not be what was asked
                raise InvalidParamsError(f"{name}: false is not supported; tokens are counted as "
                                         "generation sees them", param=name)
        if self.tools is not None and self.messages is None:
            raise InvalidParamsError("tools: only with messages", param="tools")
        if self.messages is not None:
            plan = ToolPlan.of(self.tools, None)
            return GenerationRequest(GenerationParams(), messages=history(self.messages),
                                     tools=plan.tool_dicts() if plan else None,
                                     tool_prompt=plan.prompt() if plan else None,
                                     add_generation_prompt=self.add_generation_prompt is not False,
                                     continue_final_message=bool(self.continue_final_message))
        if self.add_generation_prompt is False or self.continue_final_message:
            name = "continue_final_message" if self.continue_final_message else "add_generation_prompt"
            raise InvalidParamsError(f"{name}: only with messages", param=name)
        return GenerationRequest(GenerationParams(), prompt=texts[0])


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200)
    tokens: list[int] = Field(max_length=100_000)


@router.post("/tokenize", summary="Tokenize a prompt or a chat (vLLM / llama.cpp shape)")
async def tokenize(body: TokenizeRequest, request: Request):
    ids, context = await services_of(request).tokenize(body.model, body.request(), caller_of(request),
                                                       pieces=body.with_pieces)
    if body.with_pieces:
        ids = [{"id": token, "piece": _piece(raw)} for token, raw in ids]
    return {"tokens": ids, "count": len(ids), "max_model_len": context}


def _piece(raw: bytes) -> str | list[int]:
    """A token's text, or its byte values where they are not UTF-8 on their own (llama.cpp's shape)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@router.post("/detokenize", summary="Token ids back to text (vLLM / llama.cpp shape)")
async def detokenize(body: DetokenizeRequest, request: Request):
    text = await services_of(request).detokenize(body.model, body.tokens, caller_of(request))
    return {"prompt": text, "content": text}
