"""The trainer's GPU fast path, one module per technique; `configure(model, ...)` is the one call the trainer makes.

Every function here is safe to call on a CPU-only machine: where a CUDA-only piece (Flash varlen attention,
Liger's Triton kernels) is missing, it returns the portable choice and says so, so the CPU tests run the same
trainer as a GPU pod. Nothing here imports torch at import time (the operator's image has none). What each
choice buys was measured on an H100 and H200s (bench/trainer_speed.py, bench/RESULTS.md).

`configure` (fastpath.py) applies them in the order of the `speed:` line it logs:

- attention.py    "varlen": PyTorch's Flash varlen kernel over packed rows, no mask, where it computes what the
                  model computes; packing.py the rows' boundaries and the masked attention everything else runs
- kernels.py      Liger's SwiGLU/RoPE/fused linear cross-entropy, keyed by the code that runs the model, and
                  PyTorch's fused RMSNorm
- planner.py      the packed micro-batch's token budget, how many blocks checkpoint, the weight cache, from free
                  GPU memory and a memory model checked against measured peaks; what CUDA graphs add
- checkpointing.py  k-bit preparation without fp32 copies, per-block checkpointing, torch.compile of the blocks
- weights.py      the dequantized weight cache
- lora.py         the lean LoRA forward (B, scaling and sum in one addmm)
- projections.py  q, k and v as one matmul over the dequantized weights
- optimizer.py    bitsandbytes' optimizers without per-parameter syncs, a bucket at a time
- shape.py        the model's shape, FLOPs per token and MFU
- ../graphs.py    the decoder blocks' forward and backward replayed from CUDA graphs
"""

from __future__ import annotations

from .shape import (  # noqa: F401
    ATTENTION_PROJECTIONS,
    GIB,
    H100_BF16_PEAK_FLOPS,
    MLP_PROJECTIONS,
    ModelShape,
    attention_context,
    flops_per_token,
    mfu,
)
from .packing import (  # noqa: F401
    VARLEN,
    _block_mask,
    _masked_attention,
    install_packed_boundaries,
    packed_boundaries,
)
from .attention import (  # noqa: F401
    _call_varlen,
    _flash_varlen,
    _public_varlen_call,
    _varlen_call,
    choose_attention,
    register_varlen_attention,
    varlen_attention_forward,
    varlen_refused,
    varlen_unsupported,
)
from .kernels import (  # noqa: F401
    apply_kernels,
    borrow_config_defaults,
    liger_architecture,
    liger_available,
    use_native_rms_norm,
)
from .checkpointing import (  # noqa: F401
    compile_layers,
    decoder_layers,
    prepare_for_kbit_training_lean,
    set_checkpointing,
)
from .weights import (  # noqa: F401
    _dense_product,
    cache_dequantized_weights,
    dense_weight_bytes,
    drop_dequantized_weights,
)
from .lora import (  # noqa: F401
    use_lean_lora,
)
from .projections import (  # noqa: F401
    SHARED_INPUT_PROJECTIONS,
    _ProjectionGroup,
    fuse_projections,
    unfuse_projections,
)
from .optimizer import (  # noqa: F401
    BNB_BLOCK,
    BNB_PAGED_FROM,
    ELEMENTWISE_BNB_UPDATES,
    ParameterBucket,
    bucket_optimizer_parameters,
    bucket_states_fit,
    clear_grads,
    drop_optimizer_syncs,
    optimizer_sync_needed,
    per_tensor_group_sizes,
    split_buckets,
)
from .planner import (  # noqa: F401
    AUTO_REFERENCE_MICRO_BATCH,
    BatchPlan,
    GRAPH_POOL_SLACK,
    GRAPH_STATIC_TENSORS,
    MemoryModel,
    SpeedModel,
    allocator_env,
    cap_gpu_memory,
    compile_pays,
    cuda_graphs_fit,
    free_gpu_bytes,
    graphs_bytes,
    model_bytes,
    plan_batch,
    training_arguments_overrides,
    with_graphs,
)
from .fastpath import (  # noqa: F401
    SpeedSetup,
    configure,
)
