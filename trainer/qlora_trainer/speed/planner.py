"""The batch planner (`batchSize: auto`, and the packed micro-batch's token budget): the memory model a reader can
check against a measured peak (bench/trainer_speed.py reports both), the speed model the plans are ranked by,
and what CUDA graphs add to a plan.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .shape import GIB, ModelShape


def allocator_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set PyTorch's CUDA allocator to expandable segments unless the user chose otherwise.

    Packed micro-batches change length every step; with fixed segments the cache fragments and the reserved
    peak grows well past the allocated one. Must run before CUDA is initialised.
    """
    env = os.environ if env is None else env
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of activation memory per packed token, fitted to the worst-case micro-batches measured on an H200 at
    EXAONE-3.5's 2.4B and 7.8B shapes (bench/trainer_speed.py's peak at the plan's token budget, bench/RESULTS.md,
    2026-12-04).

    What one block keeps for its backward (attention-only LoRA r=16 with dropout, bf16 autocast, Liger kernels,
    varlen attention) grows with the hidden size (residual, norms, q/k/v, attention output, LoRA inputs:
    `layer_bytes_per_hidden`) and with the MLP's width (SwiGLU's two bf16 inputs: `layer_bytes_per_intermediate`):
    one size's per-hidden figure alone was 8% low at the other's. A checkpointed block keeps its input
    (`boundary_bytes_per_hidden`); the backward of a recomputed block holds `recompute_fraction` of a block more
    than what is kept (its full activations come back as the later blocks' are freed). `head_bytes_*`: what the
    loss keeps per token, nearly nothing with the fused linear cross-entropy, the fp32 logits and their gradient
    without it. `fixed_reserve_bytes` covers the allocator's slack over what it allocates (0.1-0.3 GiB measured
    with expandable segments); the CUDA context is outside PyTorch's count and already out of the free memory.
    """

    layer_bytes_per_hidden: float = 20.9
    layer_bytes_per_intermediate: float = 4.15
    unfused_extra_bytes_per_hidden: float = 7.0
    boundary_bytes_per_hidden: float = 2.3
    recompute_fraction: float = 0.28
    head_bytes_fused: float = 64.0
    head_bytes_per_vocab_unfused: float = 16.0
    fixed_reserve_bytes: int = int(0.25 * GIB)
    safety: float = 0.9

    def per_token(self, shape: ModelShape, checkpointed_fraction: float, fused_loss: bool) -> float:
        per_hidden = self.layer_bytes_per_hidden + (0.0 if fused_loss else self.unfused_extra_bytes_per_hidden)
        layer = per_hidden * shape.hidden_size + self.layer_bytes_per_intermediate * shape.intermediate_size
        boundary = self.boundary_bytes_per_hidden * shape.hidden_size
        kept = shape.num_layers * ((1 - checkpointed_fraction) * layer + checkpointed_fraction * boundary)
        recompute = self.recompute_fraction * layer if checkpointed_fraction > 0 else 0.0
        head = self.head_bytes_fused if fused_loss else self.head_bytes_per_vocab_unfused * shape.vocab_size
        return kept + recompute + head


@dataclass(frozen=True)
class SpeedModel:
    """Seconds per micro-batch of T packed tokens: the larger of the host's time to issue the step and the
    GPU's time to run it, each longer by the recomputed share. Measured on an H100 and H200s with EXAONE-2.4B's
    shape (bench/RESULTS.md): issuing one forward+backward of a 4-bit peft model costs about 0.4 s of host time
    whatever T is (0.22 s with the dequantized weight cache, the fused RMSNorm and the Trainer's per-step walks
    gone; 0.18 s compiled), so a micro-batch below ~10k tokens is host-bound and larger ones are nearly free.
    GPU seconds per token are scaled by matmul parameters from the 2.4B measurement.
    """

    host_s: float = 0.42
    host_s_dense: float = 0.22
    host_s_compiled: float = 0.18
    compile_s: float = 75.0
    host_recompute: float = 0.35
    gpu_s_per_token_2b4: float = 24.5e-6
    gpu_recompute: float = 0.5
    reference_matmul_params: float = 2.40e9

    def step_seconds(
        self, tokens: float, checkpointed_fraction: float, shape: ModelShape | None = None, dense: bool = False
    ) -> float:
        scale = shape.matmul_params / self.reference_matmul_params if shape else 1.0
        host = (self.host_s_dense if dense else self.host_s) * (1 + self.host_recompute * checkpointed_fraction)
        gpu = tokens * self.gpu_s_per_token_2b4 * scale * (1 + self.gpu_recompute * checkpointed_fraction)
        return max(host, gpu)

    def relative(
        self, mean_tokens: float, checkpointed_fraction: float, shape: ModelShape | None = None, dense: bool = False
    ) -> float:
        """Tokens per second of the plan, in model units."""
        return mean_tokens / self.step_seconds(mean_tokens, checkpointed_fraction, shape, dense)


def compile_pays(total_steps: int, micro_batches_per_step: int = 1, speed: SpeedModel = SpeedModel()) -> bool:
    """Whether torch.compile of the blocks earns back its warm-up over the run (host-bound micro-batches only).

    Measured on an H200 with EXAONE-2.4B's shape: compiling costs about 75 s once and saves about 0.04 s a
    micro-batch, so it pays from roughly 1,900 micro-batches (sixteen epochs of 2,000 examples at 16 a step)."""
    saved = (speed.host_s_dense - speed.host_s_compiled) * total_steps * micro_batches_per_step
    return saved > speed.compile_s


@dataclass(frozen=True)
class BatchPlan:
    """What `plan_batch` chose and why; `describe()` is the line the trainer logs."""

    micro_batch: int
    accumulation_steps: int
    token_budget: int
    packed: bool
    checkpointed_layers: int
    num_layers: int
    worst_case_tokens: int
    dense_weights: bool
    estimated_peak_bytes: int
    budget_bytes: int
    reason: str
    alternatives: list[dict[str, Any]] = field(default_factory=list, compare=False, repr=False)

    @property
    def optimizer_batch(self) -> int:
        return self.micro_batch * self.accumulation_steps

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpointed_layers > 0

    def describe(self) -> str:
        if not self.checkpointed_layers:
            ckpt = "off"
        elif self.checkpointed_layers >= self.num_layers:
            ckpt = "every block"
        else:
            ckpt = f"{self.checkpointed_layers} of {self.num_layers} blocks"
        batching = (
            f"optimizer batch {self.optimizer_batch} packed, micro-batches of at most {self.token_budget} tokens"
            if self.packed
            else f"micro-batch {self.micro_batch} x accumulation {self.accumulation_steps}"
        )
        return (
            f"{batching}, checkpointing {ckpt}, "
            f"{'dequantized weight cache, ' if self.dense_weights else ''}"
            f"worst case {self.worst_case_tokens} tokens, est. peak {self.estimated_peak_bytes / GIB:.1f} "
            f"of {self.budget_bytes / GIB:.1f} GiB: {self.reason}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("alternatives")
        data["gradient_checkpointing"] = self.gradient_checkpointing
        return data


def plan_batch(
    *,
    optimizer_batch: int,
    max_length: int,
    mean_length: float,
    budget_bytes: int,
    model_bytes: int,
    shape: ModelShape,
    fused_loss: bool,
    dense_weight_bytes: int = 0,
    packed: bool = True,
    allow_checkpointing: bool = True,
    memory: MemoryModel = MemoryModel(),
    speed: SpeedModel = SpeedModel(),
) -> BatchPlan:
    """Choose the micro-batch size, checkpointing and weight cache for training within `budget_bytes`.

    The optimizer batch (examples per optimizer step) is kept, so learning is unchanged. `packed`: each step's
    examples come as one packed row cut at example boundaries into micro-batches of at most `token_budget`
    tokens (a multiple of max_length, so one example always fits); else micro-batches of k padded examples,
    k a divisor of the optimizer batch. The worst case (budget tokens, or k * max_length) must fit
    `budget_bytes` (free GPU memory at start, or a cap) after the model's own `model_bytes`. Among the plans
    that fit, the one with the highest modelled throughput (`SpeedModel`) wins; checkpointing covers only as
    many blocks as needed, so a card with room recomputes nothing. With `dense_weight_bytes` > 0 a plan may
    also keep the frozen weights dequantized (`cache_dequantized_weights`) where that room is left over.
    """
    if optimizer_batch < 1 or max_length < 1:
        raise ValueError("optimizer_batch and max_length must be at least 1")
    usable = (budget_bytes - model_bytes - memory.fixed_reserve_bytes) * memory.safety
    layers = shape.num_layers
    divisors = [k for k in range(1, optimizer_batch + 1) if optimizer_batch % k == 0]
    counts = range(layers + 1) if allow_checkpointing else (0,)
    dense_options = (False, True) if dense_weight_bytes > 0 else (False,)
    candidates: list[dict[str, Any]] = []
    sizes = range(1, optimizer_batch + 1) if packed else divisors
    # A step's packed tokens, with room for the spread between steps (the loader does not balance them).
    step_tokens = optimizer_batch * mean_length * 1.15
    for k in sizes:
        worst = k * max_length
        micro = max(1, math.ceil(step_tokens / worst)) if packed else optimizer_batch // k
        tokens = (step_tokens / micro) if packed else k * mean_length
        for count in counts:
            frac = count / layers
            for dense in dense_options:
                need = worst * memory.per_token(shape, frac, fused_loss) + (dense_weight_bytes if dense else 0)
                fits = need <= usable
                candidates.append(
                    {
                        "micro_batch": k,
                        "checkpointed_layers": count,
                        "dense": dense,
                        "need_bytes": int(need),
                        "fits": fits,
                        "score": speed.relative(tokens, frac, shape, dense) if fits else 0.0,
                    }
                )
    fitting = [c for c in candidates if c["fits"]]
    if not fitting:
        # Nothing provably fits: one example per micro-batch, checkpointing every block, and say so.
        count = layers if allow_checkpointing else 0
        best = {"micro_batch": 1, "checkpointed_layers": count, "dense": False}
        need = int(max_length * memory.per_token(shape, count / layers, fused_loss))
        reason = "nothing fits the estimate; smallest plan"
    else:
        # Highest score; ties go to no weight cache, less recomputation, then the larger micro-batch.
        best = max(
            fitting,
            key=lambda c: (round(c["score"], 3), not c["dense"], -c["checkpointed_layers"], c["micro_batch"]),
        )
        need = best["need_bytes"]
        reason = "largest modelled throughput that fits"
    k = best["micro_batch"]
    return BatchPlan(
        micro_batch=optimizer_batch if packed else k,
        accumulation_steps=1 if packed else optimizer_batch // k,
        token_budget=k * max_length,
        packed=packed,
        checkpointed_layers=best["checkpointed_layers"],
        num_layers=layers,
        worst_case_tokens=k * max_length,
        dense_weights=best["dense"],
        estimated_peak_bytes=int(model_bytes + memory.fixed_reserve_bytes + need),
        budget_bytes=int(budget_bytes),
        reason=reason,
        alternatives=candidates,
    )


def free_gpu_bytes(device: Any = None) -> tuple[int, int]:
    """(free, total) bytes of the CUDA device, honouring a per-process memory fraction; (0, 0) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "_qlora_memory_fraction", None)
    if fraction:
        cap = int(total * fraction) - torch.cuda.memory_reserved(device)
        free = min(free, max(cap, 0))
    return int(free), int(total)


def cap_gpu_memory(gib: float, device: Any = None) -> float:
    """Limit this process to `gib` of the GPU (to rehearse a smaller card); returns the fraction set."""
    import torch

    total = torch.cuda.get_device_properties(device or 0).total_memory
    fraction = min(1.0, gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    torch.cuda._qlora_memory_fraction = fraction  # read back by free_gpu_bytes
    return fraction


def training_arguments_overrides(plan: BatchPlan) -> dict[str, Any]:
    """The transformers TrainingArguments a plan implies (the trainer merges these over the config's).

    Checkpointing stays off in the arguments: `prepare_for_kbit_training_lean` already set it per block, and
    the Trainer's own switch would turn it on for every block."""
    return {
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation_steps,
        "gradient_checkpointing": False,
    }


def model_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers (4-bit weights counted as stored)."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
    return total


# What CUDA graphs add to a plan's peak: their static inputs and outputs (hidden states, output, its gradient) at
# the token budget, and their pool's slack over the eager allocator (measured: 25.1 -> 26.5 GiB reserved, H200).
GRAPH_STATIC_TENSORS = 3


GRAPH_POOL_SLACK = 0.1


def graphs_bytes(plan: BatchPlan, shape: ModelShape) -> int:
    """What the CUDA graphs add to `plan`'s peak (without them in its estimate)."""
    static = GRAPH_STATIC_TENSORS * plan.token_budget * shape.hidden_size * 2  # bf16
    return int(static + GRAPH_POOL_SLACK * plan.estimated_peak_bytes)


def cuda_graphs_fit(plan: BatchPlan, shape: ModelShape) -> bool:
    """Whether the blocks may train from CUDA graphs (graphs.py) under `plan`: it recomputes no block (a graph
    of checkpointed blocks is not captured) and its estimated peak leaves room for what the graphs add."""
    if plan.checkpointed_layers:
        return False
    return plan.estimated_peak_bytes + graphs_bytes(plan, shape) <= plan.budget_bytes


def with_graphs(plan: BatchPlan, shape: ModelShape) -> BatchPlan:
    """`plan` with the graphs' memory in its estimated peak, once the graphs are installed (measured on an H200
    at 7.8B: 76.3 GiB allocated at the 16,384-token worst case against 71.7 estimated without them)."""
    import dataclasses

    extra = graphs_bytes(plan, shape)
    return dataclasses.replace(
        plan, estimated_peak_bytes=plan.estimated_peak_bytes + extra, reason=f"{plan.reason}; CUDA graphs' memory included"
    )


# `batchSize: auto` keeps the optimizer batch of the API's default micro-batch (2) x gradientAccumulationSteps.
AUTO_REFERENCE_MICRO_BATCH = 2
