"""What Shoal reads from a GGUF's header to size llama.cpp's KV and check token ids (no weights read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def gguf_facts(path: Path) -> dict[str, int]:
    """Layer count, KV width and trained context from a GGUF's header (no weights read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field_ = reader.fields.get(key)
        if field_ is None:
            return None
        part = field_.parts[field_.data[0]]
        return bytes(part).decode() if field_.types and field_.types[0].name == "STRING" else int(part[0])

    arch = value("general.architecture") or "llama"
    heads = value(f"{arch}.attention.head_count") or 1
    embed = value(f"{arch}.embedding_length") or 0
    head_dim = value(f"{arch}.attention.key_length") or (embed // heads if heads else 0)
    value_dim = value(f"{arch}.attention.value_length") or head_dim
    return {"layers": value(f"{arch}.block_count") or 0, "kv_heads": value(f"{arch}.attention.head_count_kv") or heads,
            "key_dim": head_dim, "value_dim": value_dim, "context": value(f"{arch}.context_length") or 2048,
            "parameters": sum(int(t.n_elements) for t in reader.tensors),
            "vocab": len(tokens.data) if (tokens := reader.fields.get("tokenizer.ggml.tokens")) else 0}
