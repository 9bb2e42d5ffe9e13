"""Linear layers with weights prepacked for oneDNN, for models run on a CPU.

`torch.nn.Linear` on a CPU calls MKL's sgemm, which repacks the weight matrix on every call.
For the skinny matrices of decoding (a batch of 1-32 rows against a 576x1536 weight) that repack
is a large part of the cost. oneDNN can pack a weight once, at load, into the blocked layout its
kernels read (`torch.ops.mkldnn._reorder_linear_weight`, the op Inductor uses when it freezes a
model). Measured on SmolLM2-135M, this 2-core machine (`bench/cpu_linear.py`): a decode step
takes about 0.85x the time with one row, 0.6x with four, 0.8x with 16 and 32, and greedy tokens
are the same.

Weights tied to another parameter (a language-model head sharing the embedding matrix) are left
as they are: packing would keep a second copy of the largest matrix.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

log = logging.getLogger("shoal.cpu_linear")


def available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear(torch.nn.Module):
    """A `Linear` whose weight lives in oneDNN's blocked layout; inference only."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(),
                                                                         requires_grad=False)
        self.dtype = linear.weight.dtype

    @property
    def packed_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias,
                                               "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(model: torch.nn.Module) -> int:
    """Replace the model's untied CPU float32/bfloat16 `Linear` layers by `PackedLinear`.
    Returns how many were replaced (0 when oneDNN is not there or nothing qualifies)."""
    if not available():
        return 0
    shared = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    targets = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (type(child) is torch.nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype in (torch.float32, torch.bfloat16)
                    and shared[child.weight.data_ptr()] == 1):
                targets.append((parent, name, child))
    try:
        packed = [(parent, name, PackedLinear(child)) for parent, name, child in targets]
    except RuntimeError as exc:  # an unusual shape or a oneDNN build without the op: keep Linear
        log.warning("not packing linear weights for oneDNN: %s", exc)
        return 0
    for parent, name, module in packed:
        setattr(parent, name, module)
    if packed:
        # The checkpoint is memory-mapped: the other tensors would keep the whole file mapped,
        # and the pages of the now unused weights counted in the process's memory (~400 MB for
        # SmolLM2). Copy what is left so the mapping goes.
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    return len(packed)


def packed_bytes(model: torch.nn.Module) -> int:
    return sum(m.packed_bytes for m in model.modules() if isinstance(m, PackedLinear))
