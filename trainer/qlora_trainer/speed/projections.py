"""Fused projections: the frozen weights of projections that read the same input (q, k and v) as one matmul.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

from .lora import _lean_adapter, _plus_lora
from .weights import _dense_product


# Projections that read the same input, fused into one matmul by `fuse_projections`.
SHARED_INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def fuse_projections(model: Any, names: Sequence[str] = SHARED_INPUT_PROJECTIONS) -> int:
    """Run the frozen weights of projections that read the same input (an attention block's q, k and v) as one
    matmul; returns how many groups.

    The group's weights are concatenated once and each member's weight becomes a view into the whole, so no
    memory is added: the dequantized copies of `cache_dequantized_weights`, or the weights of plain frozen
    `nn.Linear` layers. The first member called with an input computes the base products of all of them in one
    matmul (and its backward in one), adds each one's LoRA update as `use_lean_lora` does (its own dropout draw,
    A, then B, scaling and sum in one `addmm`) and hands the others their outputs when they are called with the
    same, unchanged tensor. A layer in any state the lean forward does not cover, or called with another input,
    runs its own forward. Only where every member has such a weight and none has a bias."""
    import torch

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        LoraLayer = ()  # noqa: N806 - no peft: only plain layers
    count = 0
    for parent in model.modules():
        members = [getattr(parent, name, None) for name in names]
        if any(m is None or hasattr(m, "_qlora_group") for m in members):
            continue
        bases = [m.get_base_layer() if isinstance(m, LoraLayer) else m for m in members]
        weights = [_frozen_dense_weight(b) for b in bases]
        if any(w is None for w in weights) or any(getattr(b, "bias", None) is not None for b in bases):
            continue
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            continue
        fused = torch.cat([w.detach() for w in weights])  # held by the group, and by the members' views
        group = _ProjectionGroup(members, fused, [w.shape[0] for w in weights], LoraLayer)
        start = 0
        for member, base, weight in zip(members, bases, weights):
            view = fused[start : start + weight.shape[0]]
            start += weight.shape[0]
            if hasattr(base, "_qlora_dense"):
                base._qlora_dense = view
            else:
                base.weight.data = view
            member._qlora_group = group
            member._qlora_unfused = member.__dict__.get("forward")
            member.forward = types.MethodType(_grouped_forward, member)
        count += 1
    return count


def unfuse_projections(model: Any) -> int:
    """Undo `fuse_projections`: every member runs its own forward again (its weight stays a view of the
    concatenation, which the members keep alive); returns the groups undone."""
    groups = set()
    for module in model.modules():
        if hasattr(module, "_qlora_group"):
            groups.add(id(module.__dict__.pop("_qlora_group")))
            unfused = module.__dict__.pop("_qlora_unfused")
            module.__dict__.pop("forward", None)
            if unfused is not None:
                module.forward = unfused
    return len(groups)


def _frozen_dense_weight(layer: Any) -> Any:
    """The ordinary (out, in) weight a layer multiplies with, if it is frozen and ours to share, else None."""
    import torch

    dense = getattr(layer, "_qlora_dense", None)
    if dense is not None:
        return dense
    if type(layer) is torch.nn.Linear and not layer.weight.requires_grad:
        return layer.weight
    return None


class _ProjectionGroup:
    """The members of one fused group, their concatenated weight, and the outputs computed but not yet taken."""

    def __init__(self, members: list, weight: Any, sizes: list[int], lora_type: Any) -> None:
        self.members, self.weight, self.sizes, self.lora_type = members, weight, sizes, lora_type
        self.input: Any = None
        self.version = -1
        self.pending: dict[int, Any] = {}

    def take(self, member: Any, x: Any) -> Any:
        """The output computed earlier for `member` from this very input, unchanged since, else None."""
        if self.input is not x or x._version != self.version:
            return None
        out = self.pending.pop(id(member), None)
        if not self.pending:
            self.input = None  # every member has its output: hold on to nothing
        return out

    def compute(self, x: Any) -> bool:
        """Every member's output for `x`, kept for `take`; False (nothing kept) when one of them is in a state
        only its own forward covers, or `x` is an inference tensor, which keeps no version to tell a change by."""
        if x.is_inference():
            return False
        adapters = []
        for member in self.members:
            if isinstance(member, self.lora_type):
                name = _lean_adapter(member, x, (), {})
                if name is None:
                    return False
                adapters.append(name)
            else:
                adapters.append(None)
        outs = {}
        for member, name, part in zip(self.members, adapters, _dense_product(x, self.weight).split(self.sizes, -1)):
            outs[id(member)] = part.contiguous() if name is None else _plus_lora(member, name, x, part)
        self.input, self.version, self.pending = x, x._version, outs
        return True


def _grouped_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    if not args and not kwargs:
        group = self._qlora_group
        out = group.take(self, x)
        if out is None and group.compute(x):
            out = group.take(self, x)
        if out is not None:
            return out
    own = self._qlora_unfused
    return own(x, *args, **kwargs) if own is not None else type(self).forward(self, x, *args, **kwargs)
