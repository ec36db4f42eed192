"""k-bit preparation without fp32 copies, activation checkpointing on as many decoder blocks as the plan says,
and torch.compile of the blocks.
"""

from __future__ import annotations

from typing import Any


def prepare_for_kbit_training_lean(model: Any, checkpointed_layers: int | None = 0) -> Any:
    """peft's `prepare_model_for_kbit_training` without its fp32 copies of every non-quantized weight.

    peft upcasts the embeddings and norms of a 4-bit model to fp32 (1 GiB more for a 102k x 2560 embedding, and
    fp32 activations behind them). Under bf16 autocast nothing needs them: the frozen weights stay in the
    compute dtype, the trainable LoRA weights peft adds later stay fp32 for the optimizer.

    `checkpointed_layers`: how many decoder blocks recompute their activations in the backward (None: all;
    0: none). Non-reentrant checkpointing, so no input-requires-grad hook is needed. Which blocks does not
    matter for the peak (every kept activation is alive at the turn from forward to backward): the first ones.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    return set_checkpointing(model, checkpointed_layers)


def set_checkpointing(model: Any, checkpointed_layers: int | None) -> Any:
    """Non-reentrant checkpointing on the first `checkpointed_layers` blocks (None: all; 0: off)."""
    if checkpointed_layers == 0:
        on = getattr(model, "is_activation_checkpointing", None)
        if on is None:
            on = getattr(model, "is_gradient_checkpointing", False)
        if on:
            off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            off()
        return model
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if checkpointed_layers is not None:
        for index, layer in enumerate(decoder_layers(model)):
            layer.gradient_checkpointing = index < checkpointed_layers
    return model


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks of a transformers model, in order (the modules checkpointing wraps)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: Any, mode: str | None = None) -> int:
    """torch.compile each decoder block (dynamic shapes: packed rows change length every step); returns how
    many. The blocks share one compiled graph. Only on CUDA; a CPU run is left eager."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True, mode=mode)
    return len(layers)
