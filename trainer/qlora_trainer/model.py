"""The model: the base loaded in 4 or 8 bits with bitsandbytes, made ready for k-bit training, with LoRA
adapters added through peft. `load_model(cfg)` is the one place a model is prepared; the deciding parts
(quantization config, LoRA targets, LoRA config) are pure functions.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Iterable

from .config import LoraConfig as LoraSpec
from .config import QuantizationConfig, TrainerConfig
from .errors import InvalidConfig, ModelLoadFailed

log = logging.getLogger(__name__)

# Path segments that mark an attention block across architectures: Llama/Mistral/Qwen/Gemma/Phi-3
# `self_attn`, GPT-2 `attn`, EXAONE 3.x remote code `attn.attention`, Falcon `self_attention`.
_ATTENTION_SEGMENT = re.compile(r"(^|_)(attn|attention)($|_)")


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(q: QuantizationConfig):
    """The `BitsAndBytesConfig` of the quantization section."""
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
    )


def linear_module_names(model) -> list[str]:
    """Qualified names of the linear layers LoRA can wrap (nn.Linear, bitsandbytes, GPT-2's Conv1D),
    without the output head."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb

        kinds += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:  # a GPU-less image may lack bitsandbytes' CUDA parts; nn.Linear still counts
        pass
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if isinstance(module, kinds) and module is not output]


def attention_targets(names: Iterable[str]) -> list[str]:
    """LoRA target keys for the attention projections among the linear layer names.

    A layer counts when a segment of its path names attention (`self_attn`, `attn`, `attention`). The key is
    its last segment (`q_proj`), or `parent.last` (`attn.c_proj`) when that last segment is also used by a
    layer outside attention, as GPT-2's `c_proj` is in its MLP. peft matches a key against the end of names.
    """
    names = list(names)
    inside = [n for n in names if any(_ATTENTION_SEGMENT.search(s) for s in n.split(".")[:-1])]
    outside_leaves = {n.rsplit(".", 1)[-1] for n in names if n not in inside}
    keys: list[str] = []
    for name in inside:
        parts = name.split(".")
        key = parts[-1] if parts[-1] not in outside_leaves else ".".join(parts[-2:])
        if key not in keys:
            keys.append(key)
    return keys


def matches(key: str, name: str) -> bool:
    """peft's rule for a target key given as a list entry: the whole name, or its dotted end."""
    return name == key or name.endswith("." + key)


def resolve_targets(spec: LoraSpec, names: list[str]) -> list[str] | str:
    """The target modules to give peft: the configured list (each must match a layer), `all-linear`, or
    the attention projections found among `names`."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if spec.target_modules == "all-linear":
        return "all-linear"
    if not spec.target_modules:
        found = attention_targets(names)
        if not found:
            raise InvalidConfig(
                "lora.targetModules is empty and no attention projections were found in this model; "
                f"name them, or use all-linear. Linear layers: {', '.join(leaves)}"
            )
        return found
    missing = [key for key in spec.target_modules if not any(matches(key, n) for n in names)]
    if missing:
        raise InvalidConfig(
            f"lora.targetModules: {', '.join(missing)} match no layer of this model; "
            f"its linear layers are: {', '.join(leaves)} (or use all-linear)"
        )
    return list(spec.target_modules)


def lora_config(spec: LoraSpec, targets: list[str] | str):
    """The peft `LoraConfig` of the lora section."""
    from peft import LoraConfig

    if spec.init in ("loftq", "eva"):
        raise InvalidConfig(
            f"lora.init: {spec.init} needs a data or full-precision pass this trainer does not run yet; "
            "use gaussian, default, pissa or olora"
        )
    init = {"default": True}.get(spec.init, spec.init)
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        use_rslora=spec.use_rslora,
        init_lora_weights=init,
        bias=spec.bias,
        task_type="CAUSAL_LM",
    )


def device_map(gpus: int) -> dict[str, str]:
    """Everything on one device: the CPU with `gpus: 0`, else this process's GPU (LOCAL_RANK under DDP)."""
    if gpus == 0:
        return {"": "cpu"}
    return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}


def load_tokenizer(cfg: TrainerConfig):
    """The tokenizer of the base model, with a pad token and right padding for training."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as err:  # hub, file and remote-code errors come in many types
        raise ModelLoadFailed(_load_message("tokenizer", cfg, err)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(cfg: TrainerConfig, quantized: bool = True):
    """The base causal LM: quantized with bitsandbytes (or in compute dtype, for merging)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=torch_dtype(cfg.quantization.compute_dtype),
        device_map=device_map(cfg.gpus) if quantized else {"": "cpu"},
    )
    if quantized:
        kwargs["quantization_config"] = quantization_config(cfg.quantization)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name, **kwargs)
    except Exception as err:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise ModelLoadFailed(_load_message("model", cfg, err)) from None
    if quantized and cfg.gpus == 0:
        keep_cpu_weights_trainable(model)
    return model


def keep_cpu_weights_trainable(model) -> None:
    """bitsandbytes (0.50) repacks 4-bit weights for CPU inference on the first forward in eval mode, and has
    no backward through the repacked layout: after an evaluation, gradients would stop flowing through the
    base layers. Keep the trainable layout (CPU only; costs inference speed on AVX512-BF16 CPUs)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _load_message(what: str, cfg: TrainerConfig, err: Exception) -> str:
    offline = " (HF_HUB_OFFLINE is set: only cached models load)" if os.environ.get("HF_HUB_OFFLINE") else ""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"could not load the {what} of {cfg.model.name} (revision {cfg.model.revision}){offline}: {detail}"


def add_lora(model, cfg: TrainerConfig):
    """Freeze the quantized base, add LoRA adapters, and make gradient checkpointing work.

    Unlike peft's `prepare_model_for_kbit_training`, nothing is upcast to float32: norms and embeddings stay
    in compute dtype (the upcast costs gigabytes on a large vocabulary), and only the adapters train in
    float32 (peft's `autocast_adapter_dtype`).
    """
    from peft import get_peft_model

    targets = resolve_targets(cfg.lora, linear_module_names(model))
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.training.gradient_checkpointing:
        # The Trainer turns checkpointing on (training_arguments); with every base weight frozen, reentrant
        # checkpointing (remote code may use it) needs the inputs to require grads to reach the adapters.
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(cfg.lora, targets))
    return model


def supports_packing(model) -> bool:
    """Whether the model reads packed rows (position ids restarting per example) correctly: transformers'
    own implementations with sdpa, eager, flash or flex attention do; remote code may not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    native = type(base).__module__.startswith("transformers.")
    attention = getattr(base.config, "_attn_implementation", None) or ""
    return native and any(a in attention for a in ("sdpa", "eager", "flash", "flex", "varlen"))


def load_model(cfg: TrainerConfig):
    """The tokenizer and the quantized base with LoRA, ready for the Trainer: `(model, tokenizer)`."""
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg)
    model = add_lora(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "model %s loaded in %d bits; LoRA r=%d on %s: %s trainable of %s parameters",
        cfg.model.name, cfg.quantization.bits, cfg.lora.r,
        ", ".join(sorted({n.rsplit(".", 1)[-1] for n in model.peft_config["default"].target_modules})), f"{trainable:,}", f"{total:,}",
    )
    return model, tokenizer
