"""The lean LoRA forward: peft's LoRA linear layers with B, the scaling and the sum in one addmm, where the layer
is in the one state it covers.
"""

from __future__ import annotations

import types
from typing import Any


def use_lean_lora(model: Any) -> int:
    """Give peft's LoRA linear layers a forward with less Python in it; returns how many layers.

    peft runs base, a defensive copy of its output, dropout, A and B as modules, then a scaling multiply and an
    add; here the base, dropout and A run as before and B, the scaling and the sum are one `addmm`, all of it
    ordinary operators that autograd differentiates in C++ (a Python autograd function would move the backward
    into Python, which measured no faster). Same dropout draw, same bf16 products; the sum is rounded once
    instead of three times. Runs only under autocast (the GPU training path); a layer in any other state
    (adapters disabled or merged, several active adapters, DoRA or another variant, a LoRA bias, extra
    arguments) runs peft's own forward, call by call."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    import torch

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or "forward" in module.__dict__ or not hasattr(module, "lora_A"):
            continue
        if isinstance(module.get_base_layer(), torch.nn.Linear):
            module.forward = types.MethodType(_lean_lora_forward, module)
            count += 1
    return count


def _lean_adapter(layer: Any, x: Any, args: tuple, kwargs: dict) -> str | None:
    """The one active plain-LoRA adapter of a layer the lean forward covers in this call, else None."""
    import torch

    active = layer.active_adapters
    if args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in layer.lora_variant or not torch.is_autocast_enabled(x.device.type):
        return None
    if layer.lora_B[name].bias is not None or type(layer.lora_A[name]) is not torch.nn.Linear:
        return None
    return name


def _lean_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    name = _lean_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    return _plus_lora(self, name, x, self.base_layer(x))


def _plus_lora(layer: Any, name: str, x: Any, base: Any) -> Any:
    """`base` (the frozen layer's output for x) plus the adapter's update: dropout, A, then B, the scaling and
    the sum in one addmm."""
    import torch

    h = torch.nn.functional.linear(layer.lora_dropout[name](x), layer.lora_A[name].weight)
    out = torch.addmm(
        base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), layer.lora_B[name].weight.t(),
        alpha=layer.scaling[name],
    )
    return out.view(base.shape)
