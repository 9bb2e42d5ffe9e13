"""The KV layout of a running batch: per layer, keys and values in buffers sized for the batch's
whole future and written in place each step, plus the small helpers the engine uses to build,
crop and left-pad them. The engine (`engine.py`) decides who is in the batch; this module only
holds their keys and values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, seq, dim]


def layers(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


class BufferLayer(DynamicLayer):
    """One layer's KV in buffers sized for the batch's whole future, written in place each step
    (transformers' DynamicLayer concatenates, copying the whole cache on every token: a quarter
    of a 16-row step on this CPU)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        batch, heads, length, dim = keys.shape
        capacity = max(capacity, length + 1)
        self._k = keys.new_empty((batch, heads, capacity, dim))
        self._v = values.new_empty((batch, values.shape[1], capacity, values.shape[-1]))
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self._length = length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._expose()

    @property
    def reserved_bytes(self) -> int:
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def _expose(self) -> None:
        self.keys = self._k[:, :, :self._length]
        self.values = self._v[:, :, :self._length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._k.shape[2]:  # not reserved for: grow (never expected; kept for safety)
            grown = BufferLayer(self.keys, self.values, 2 * end)
            self._k, self._v = grown._k, grown._v
        self._k[:, :, self._length:end] = key_states
        self._v[:, :, self._length:end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values


def cache_from(kv: KV, capacity: int = 0) -> DynamicCache:
    cache = DynamicCache()
    for keys, values in kv:
        cache.layers.append(BufferLayer(keys, values, capacity))
    return cache


def pad_left(kv: KV, amount: int) -> KV:
    return [(F.pad(k, (0, 0, amount, 0)), F.pad(v, (0, 0, amount, 0))) for k, v in kv]
