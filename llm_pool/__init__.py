"""Shoal's model pool: catalog, backends, batched generation, residency within a memory budget.

Knows nothing about chats, sessions or HTTP. Public names are re-exported here.
"""

from .catalog import Catalog, ModelSpec, spec_from_dict
from .config import EngineConfig
from .errors import (
                     ContextOverflowError,
                     InvalidParamsError,
                     InvalidRequestError,
                     ModelLoadError,
                     ModelNotFoundError,
                     ShoalError,
)
from .params import GenerationParams
from .pool import ModelPool
from .stream import Failed, Finished, GenerationHandle, GenerationRequest, Message, TextDelta, Usage

__all__ = [
    "Catalog", "ModelSpec", "spec_from_dict", "EngineConfig", "ContextOverflowError",
    "InvalidParamsError", "InvalidRequestError", "ModelLoadError", "ModelNotFoundError", "ShoalError",
    "GenerationParams", "ModelPool", "Failed", "Finished", "GenerationHandle", "GenerationRequest",
    "Message", "TextDelta", "Usage",
]
