"""The KV layout of a running batch: per layer, keys and values in buffers sized for the batch's
whole future and written in place each step, plus the small helpers the engine uses to build,
crop and left-pad them. The engine (`engine.py`) decides who is in the batch; this module only
holds their keys and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


# ---------------------------------------------------------------- the ragged layout
# Each running request keeps its own keys and values (`RowKV`), sized for its own prompt and
# token limit. A forward pass packs every row's new tokens into one sequence (one decode token per
# running row, plus prefill chunks of rows that are still reading their prompt), so the linear
# layers run once for all of them; attention then runs row by row against that row's own KV
# (`ragged_attention`, registered with transformers as an attention implementation). Nothing is
# padded, joining or leaving copies nobody else's KV, and a row reserves only its own worst case.

ATTENTION = "shoal_ragged"


class RowKV:
    """One request's keys and values for every layer: [layers, 2, kv_heads, capacity, head_dim].
    Allocated for the whole request at once; on a CPU the pages are only committed as they are
    written, so what is resident follows what is used."""

    def __init__(self, shape: tuple[int, int, int], capacity: int, dtype: torch.dtype, device: torch.device):
        n_layers, heads, dim = shape
        self.buffer = torch.empty((n_layers, 2, heads, capacity, dim), dtype=dtype, device=device)
        self.length = 0  # positions written by finished forward passes

    @property
    def capacity(self) -> int:
        return self.buffer.shape[3]

    @property
    def reserved_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def load(self, kv: KV) -> None:
        """Start from a cached prefix ([1, heads, length, dim] per layer)."""
        length = kv[0][0].shape[2]
        for layer, (keys, values) in enumerate(kv):
            self.buffer[layer, 0, :, :length] = keys[0]
            self.buffer[layer, 1, :, :length] = values[0]
        self.length = length

    def prefix(self, length: int) -> KV:
        """A copy of the first `length` positions, in the prefix cache's shape."""
        kept = self.buffer[:, :, :, :length].clone()
        return [(kept[layer, 0].unsqueeze(0), kept[layer, 1].unsqueeze(0)) for layer in range(kept.shape[0])]


@dataclass(frozen=True)
class Segment:
    """`count` tokens of one row, at `start` in the packed sequence."""
    start: int
    count: int
    kv: RowKV


def ragged_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, **kwargs):
    """Attention for a packed forward: query [1, heads, tokens, dim]; key and value (the new
    tokens') [1, kv_heads, tokens, dim]. Without `shoal_segments` (a plain forward) it is sdpa."""
    segments: list[Segment] | None = kwargs.pop("shoal_segments", None)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, softcap=softcap, **kwargs)
    if softcap is not None or getattr(module, "sinks", None) is not None:
        raise NotImplementedError("the ragged layout has no attention softcap or sinks")
    layer = module.layer_idx
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    groups = heads // kv_heads
    out = query.new_empty((1, query.shape[2], heads, dim))
    for segment in segments:
        start, n, row = segment.start, segment.count, segment.kv
        past, end = row.length, row.length + n
        keys, values = row.buffer[layer, 0], row.buffer[layer, 1]
        keys[:, past:end] = key[0, :, start:start + n]
        values[:, past:end] = value[0, :, start:start + n]
        first = max(0, end - n - sliding_window + 1) if sliding_window else 0
        # query heads j*groups .. j*groups+groups-1 read kv head j: fold the groups into the
        # query rows, so no key is copied per head
        q = query[:, :, start:start + n].reshape(1, kv_heads, groups * n, dim)
        mask = None
        if n > 1:  # a prefill chunk: causal within the chunk, after everything before it
            q_pos = torch.arange(past, end, device=query.device)
            k_pos = torch.arange(first, end, device=query.device)
            allowed = k_pos[None, :] <= q_pos[:, None]
            if sliding_window:
                allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
            mask = allowed.repeat(groups, 1)
        # 4-D: with 3-D inputs sdpa takes its math path on a CPU (3-4x slower, measured)
        o = F.scaled_dot_product_attention(q, keys[None, :, first:end], values[None, :, first:end],
                                           attn_mask=mask, scale=scaling)
        out[0, start:start + n] = o.reshape(heads, n, dim).transpose(0, 1)
    return out, None


def register_ragged_attention() -> None:
    AttentionInterface.register(ATTENTION, ragged_attention)
    # plain forwards of such a model (no segments) get the masks sdpa would
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
