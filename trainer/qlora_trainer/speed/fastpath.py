"""`configure`, the one call the trainer makes: it puts a loaded peft model on the GPU fast path, technique by
technique in the order of the `speed:` line it logs (`SpeedSetup.describe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .attention import choose_attention, varlen_refused
from .checkpointing import set_checkpointing, compile_layers
from .kernels import apply_kernels
from .lora import use_lean_lora
from .optimizer import drop_optimizer_syncs
from .packing import VARLEN, install_packed_boundaries
from .planner import (
    AUTO_REFERENCE_MICRO_BATCH,
    BatchPlan,
    compile_pays,
    cuda_graphs_fit,
    free_gpu_bytes,
    plan_batch,
    with_graphs,
)
from .projections import fuse_projections
from .shape import ModelShape
from .weights import dense_weight_bytes, cache_dequantized_weights


@dataclass
class SpeedSetup:
    """What `configure` did to a model, for the log and the summary."""

    attention: str
    kernels: list[str]
    plan: BatchPlan | None
    dense_weight_bytes: int = 0
    compiled_layers: int = 0
    lean_lora_layers: int = 0
    fused_groups: int = 0
    graphs: Any = None  # graphs.StackGraphs, when the blocks train from CUDA graphs
    notes: list[str] = field(default_factory=list)

    @property
    def token_budget(self) -> int | None:
        """Tokens per packed micro-batch the plan chose; None: the caller's own (batchSize x maxLength)."""
        return self.plan.token_budget if self.plan else None

    @property
    def owns_checkpointing(self) -> bool:
        """True when checkpointing was set per block here: the Trainer must not switch it on for all."""
        return self.plan is not None

    @property
    def padded_batch(self) -> tuple[int, int] | None:
        """(micro-batch, accumulation) the plan chose for padded training (`batchSize: auto` without packing)."""
        return (self.plan.micro_batch, self.plan.accumulation_steps) if self.plan and not self.plan.packed else None

    def describe(self) -> str:
        parts = [f"attention {self.attention}", f"kernels {', '.join(self.kernels) or 'none'}"]
        if self.plan:
            parts.append(self.plan.describe())
        if self.lean_lora_layers:
            parts.append(f"lean forward in {self.lean_lora_layers} LoRA layers")
        if self.fused_groups:
            parts.append(f"q/k/v in one matmul in {self.fused_groups} blocks")
        if self.compiled_layers:
            parts.append(f"{self.compiled_layers} blocks compiled")
        if self.graphs is not None:
            parts.append(
                f"the {len(self.graphs.layers)} blocks trained from CUDA graphs (micro-batches padded to multiples "
                f"of {self.graphs.granularity} tokens)"
            )
        return "; ".join(parts + self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attention": self.attention,
            "kernels": self.kernels,
            "plan": self.plan.to_dict() if self.plan else None,
            "denseWeightBytes": self.dense_weight_bytes,
            "compiledLayers": self.compiled_layers,
            "leanLoraLayers": self.lean_lora_layers,
            "fusedGroups": self.fused_groups,
            "cudaGraphs": self.graphs is not None,
        }


def configure(
    model: Any,
    *,
    batch_size: int | str,
    gradient_accumulation_steps: int,
    max_length: int,
    lengths: Sequence[int],
    gradient_checkpointing: bool,
    packing: bool,
    total_steps: int = 0,
    cuda_graphs: bool = True,
) -> SpeedSetup:
    """Put a loaded peft model on the GPU fast path; a no-op on the CPU. Call after LoRA is added, before
    the Trainer is built.

    - packing on a transformers-native model: varlen attention, example boundaries from the position ids, unless
      its attention is one varlen does not compute (`varlen_refused`: the loaded attention stays, and the line
      says why);
    - Liger's kernels on the base model where the code that runs it has them (`liger_architecture`);
    - with packing, the optimizer batch (batchSize x gradientAccumulationSteps examples; `auto` counts as 2)
      is a learning setting and the micro-batch a memory detail, so `plan_batch` sizes the packed
      micro-batch's token budget from the free GPU memory whatever batchSize says, recomputes as few blocks
      as fit (none unless `gradient_checkpointing` allows it) and keeps a dequantized weight copy where
      room is left; without packing only `batchSize: auto` is planned (micro-batch and accumulation);
    - peft's LoRA layers with a leaner forward (`use_lean_lora`);
    - torch.compile of the blocks when the run (`total_steps`) is long enough to pay it back;
    - else, packed with varlen attention (and `cuda_graphs`), when `cuda_graphs_fit` the plan, the blocks'
      forward and backward replayed from CUDA graphs (`graphs.install`), one pair per padded micro-batch size.
    """
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loaded = getattr(base.config, "_attn_implementation", None) or "sdpa"
    if device.type != "cuda":
        return SpeedSetup(attention=loaded, kernels=[], plan=None)
    import torch

    attention, notes = loaded, []
    native = type(base).__module__.startswith("transformers.")
    if packing and native and choose_attention(device) == VARLEN:
        refused = varlen_refused(base, max_length)
        if refused:
            notes = [f"attention {loaded}: varlen would not compute this model's {refused}"]
        else:
            base.config._attn_implementation = VARLEN
            install_packed_boundaries(base)
            attention = VARLEN
    planned = packing or batch_size == "auto"
    will_compile = planned and packing and compile_pays(total_steps)
    # Under torch.compile only the fused loss stays Liger's: inductor fuses the norms, RoPE and SwiGLU itself.
    kernels = apply_kernels(base, layer_kernels=not will_compile)
    setup = SpeedSetup(attention=attention, kernels=kernels, plan=None, lean_lora_layers=use_lean_lora(model))
    setup.notes.extend(notes)
    if drop_optimizer_syncs():
        setup.notes.append("bitsandbytes optimizers without a device sync per parameter")
    if not planned:
        return setup
    shape = ModelShape.from_config(base.config)
    torch.cuda.synchronize(device)
    free, _ = free_gpu_bytes(device)
    held = torch.cuda.memory_allocated(device)
    plan = plan_batch(
        optimizer_batch=(AUTO_REFERENCE_MICRO_BATCH if batch_size == "auto" else int(batch_size))
        * gradient_accumulation_steps,
        max_length=max_length,
        mean_length=(sum(lengths) / len(lengths)) if lengths else max_length / 2,
        budget_bytes=free + held,
        model_bytes=held,
        shape=shape,
        fused_loss="fused_linear_cross_entropy" in kernels,
        dense_weight_bytes=dense_weight_bytes(base),
        packed=packing,
        allow_checkpointing=gradient_checkpointing,
    )
    setup.plan = plan
    if plan.dense_weights:
        setup.dense_weight_bytes = cache_dequantized_weights(base)
        if not will_compile:  # the group hands outputs over by the input's identity, which dynamo does not trace
            setup.fused_groups = fuse_projections(model)
    set_checkpointing(base, plan.checkpointed_layers)
    if will_compile:
        setup.compiled_layers = compile_layers(base)
    elif cuda_graphs and packing and attention == VARLEN:
        if cuda_graphs_fit(plan, shape):
            from .. import graphs

            setup.graphs = graphs.install(base, max_length=max_length, limit=plan.token_budget)
            if setup.graphs is not None:
                setup.plan = with_graphs(plan, shape)
        elif not plan.checkpointed_layers:
            setup.notes.append("blocks eager: no room left for CUDA graphs' memory")
    return setup
