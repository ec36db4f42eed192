"""The dequantized weight cache: a bf16 copy of every frozen 4-bit weight, multiplied with directly (bitsandbytes
dequantizes to the same numbers on every call, forward and backward).
"""

from __future__ import annotations

import types
from typing import Any


def dense_weight_bytes(model: Any) -> int:
    """Bytes that `cache_dequantized_weights` would add: the 4-bit weights at 2 bytes each (0 off CUDA)."""
    if next(model.parameters()).device.type != "cuda":
        return 0
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(
        2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
    )


def cache_dequantized_weights(model: Any) -> int:
    """Keep a bf16 copy of every frozen 4-bit weight on the GPU and multiply with it directly.

    The numbers are the same as bitsandbytes' own training path, which dequantizes the NF4 weight to the
    compute dtype and then runs an ordinary matmul, in the forward and again in the backward. Doing that once
    instead removes two dequantization kernels and bitsandbytes' Python layer from every linear call, which is
    much of the host time of a step (EXAONE-2.4B's shape on an H100: 4.0 GiB more, 12-60% more tokens/s,
    bench/RESULTS.md), and a plain matmul saves no input for the frozen weight's gradient. The 4-bit weights stay the model's
    weights: the adapter, checkpoints and merges never see the copy. Call `drop_dequantized_weights`
    before merging an adapter into the base. Returns the bytes added; 0 on the CPU or without bitsandbytes.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        return 0
    added = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or hasattr(module, "_qlora_dense"):
            continue
        weight = module.weight
        if weight.device.type != "cuda" or getattr(weight, "quant_state", None) is None:
            continue
        dtype = module.compute_dtype or weight.quant_state.dtype
        dense = dequantize_4bit(weight.data, weight.quant_state).to(dtype).reshape(module.out_features, module.in_features)
        module.register_buffer("_qlora_dense", dense, persistent=False)
        module.forward = types.MethodType(_dense_linear_forward, module)
        added += dense.numel() * dense.element_size()
    return added


def _dense_linear_forward(self: Any, x: Any) -> Any:
    weight = self._qlora_dense
    return _dense_product(x, weight, None if self.bias is None else self.bias.to(weight.dtype))


def _dense_product(x: Any, weight: Any, bias: Any = None) -> Any:
    """x times a dequantized weight, in the weight's dtype, returned in x's (what bitsandbytes' layer returns)."""
    import torch

    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def drop_dequantized_weights(model: Any) -> int:
    """Undo `cache_dequantized_weights` and `fuse_projections` (before a merge, or to give the memory back);
    returns the 4-bit modules restored."""
    from .projections import unfuse_projections  # projections builds on this module's dense product

    unfuse_projections(model)
    restored = 0
    for module in model.modules():
        if hasattr(module, "_qlora_dense"):
            del module._qlora_dense
            module.__dict__.pop("forward", None)
            restored += 1
    return restored
