"""Fused kernels: Liger's SwiGLU, RoPE and fused linear cross-entropy, looked up by the transformers code that runs
the model (a table keyed by what the model is, not by its `model_type`), and PyTorch's fused RMSNorm for any
norm it reproduces.
"""

from __future__ import annotations

import inspect
import logging
import types
from typing import Any

log = logging.getLogger(__name__)


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401  (imports Triton)
    except Exception:  # noqa: BLE001 - Triton may fail to import on a machine without a GPU
        return False
    return True


def apply_kernels(model: Any, *, fused_loss: bool = True, layer_kernels: bool = True) -> list[str]:
    """Swap in fused kernels where the model's architecture has them; returns what was applied.

    Call before peft wraps the model. Only on CUDA: on the CPU nothing changes and the list is empty. Liger's
    Triton kernels for SwiGLU, RoPE and the loss where Liger knows the code that runs the model
    (`liger_architecture`: EXAONE 3.x as shipped runs as Llama; not its remote code); PyTorch's own fused RMSNorm for any architecture whose norm it reproduces. The fused linear
    cross-entropy never materialises the (tokens x 102k) logits: the largest single saving in memory.
    `layer_kernels=False` (under torch.compile, which fuses the blocks itself) keeps only the loss.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return []
    applied = _apply_liger(model, fused_loss=fused_loss, layer_kernels=layer_kernels) if liger_available() else []
    # Liger's RMSNorm costs several times more host time to launch than PyTorch's fused one, on a host-bound step.
    if layer_kernels and use_native_rms_norm(model):
        applied.append("rms_norm")
    return applied


def _apply_liger(model: Any, *, fused_loss: bool, layer_kernels: bool) -> list[str]:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    # Liger logs a warning per optional backend it cannot load (CuTe DSL, Ascend); none is used here.
    logging.getLogger("liger_kernel").setLevel(logging.ERROR)

    architecture = liger_architecture(model, MODEL_TYPE_TO_APPLY_LIGER_FN)
    if architecture is None:
        log.info("no Liger kernels for %s (model type %s)", type(model).__name__, model.config.model_type)
        return []
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[architecture]
    borrow_config_defaults(model.config, architecture)
    wanted = {
        "rope": layer_kernels,
        "rms_norm": False,  # use_native_rms_norm instead
        "swiglu": layer_kernels,
        "fused_linear_cross_entropy": fused_loss,
        "cross_entropy": not fused_loss,
    }
    params = inspect.signature(apply).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    apply(model=model, **kwargs)
    return [k for k, v in kwargs.items() if v]


def liger_architecture(model: Any, table: Any) -> str | None:
    """The key of Liger's per-architecture table (`table`) for the code that runs `model`, else None.

    Liger's functions patch one transformers modeling module (`apply_liger_kernel_to_llama` patches
    `modeling_llama`), so the key is that module's: a model whose own `model_type` names another module is run
    by that module's classes. EXAONE 3.x as the hub ships it is `model_type: exaone`, which transformers loads
    as `LlamaForCausalLM` and Liger's table does not list: it gets Llama's kernels, as a Llama-typed copy of
    the same weights does. Remote code is not transformers' module, so Liger's patches would not reach it: None.
    """
    parts = type(model).__module__.split(".")
    if len(parts) != 4 or parts[:2] != ["transformers", "models"] or parts[3] != f"modeling_{parts[2]}":
        return None
    package = parts[2]
    model_type = getattr(model.config, "model_type", None)
    if model_type in table:
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        # gemma3_text lives in modeling_gemma3: the type's own entry, where the type is that module's.
        if model_type_to_module_name(model_type) == package:
            return model_type
    return package if package in table else None


def borrow_config_defaults(config: Any, architecture: str) -> list[str]:
    """Give `config` the fields of `architecture`'s own config class that it lacks, at their defaults; returns
    their names. Liger's forward for an architecture reads that class's fields (Llama's loss forward reads
    `pretraining_tp`, which EXAONE's config has not: an AttributeError at the first step). A field the config
    has keeps its value; the added defaults are what the architecture's code assumes when they are absent."""
    import dataclasses

    from transformers import CONFIG_MAPPING

    own = CONFIG_MAPPING[architecture] if architecture in CONFIG_MAPPING else None
    if own is None or isinstance(config, own) or not dataclasses.is_dataclass(own):
        return []
    added = []
    for spec in dataclasses.fields(own):
        if not hasattr(config, spec.name) and spec.default is not dataclasses.MISSING:
            setattr(config, spec.name, spec.default)
            added.append(spec.name)
    return added


def use_native_rms_norm(model: Any) -> int:
    """Run the model's RMSNorm layers through PyTorch's fused `rms_norm` (one operator and one kernel each
    way, which skips the frozen weight's gradient) instead of their own few elementwise operators; returns how
    many layers. A layer class is switched only after one of its layers gave the same output both ways on a
    random input, so a norm with other arithmetic (Gemma's 1 + weight, say) keeps its own forward."""
    import torch

    matches: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        cls = type(module)
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if "RMSNorm" not in cls.__name__ or "forward" in module.__dict__ or not isinstance(eps, float):
            continue
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
            continue
        if cls not in matches:
            matches[cls] = _native_rms_norm_matches(module, eps)
        if matches[cls]:
            module._qlora_eps = eps
            module.forward = types.MethodType(_native_rms_norm_forward, module)
            count += 1
    return count


def _native_rms_norm_matches(module: Any, eps: float) -> bool:
    import torch

    weight = module.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(8, weight.numel(), device=weight.device, dtype=weight.dtype, generator=generator) * 3
    with torch.no_grad():
        try:
            own = module(x).float()
        except Exception:  # noqa: BLE001 - a norm that wants more than the hidden states keeps its forward
            return False
        native = torch.nn.functional.rms_norm(x, weight.shape, weight, eps).float()
    return bool(torch.allclose(own, native, rtol=2e-2, atol=2e-2))


def _native_rms_norm_forward(self: Any, hidden_states: Any) -> Any:
    import torch

    if hidden_states.dtype != self.weight.dtype:
        return type(self).forward(self, hidden_states)
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device):
        # Autocast may run norms in fp32; the layer's own forward returns the input dtype.
        with torch.autocast(device, enabled=False):
            return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self._qlora_eps)
    return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self._qlora_eps)
