"""Model shape and model FLOPs: what the planner's memory model and MFU need to know about a decoder-only
transformer, and MFU as the benchmark reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence


# bf16 dense matrix peak of an H100 SXM, the denominator of model FLOPs utilisation.
H100_BF16_PEAK_FLOPS = 989e12


GIB = 1024**3


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs and memory arithmetic needs to know about a decoder-only transformer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (Llama/Mistral/Qwen naming, with EXAONE's names as fallbacks)."""

        def pick(*names: str) -> Any:
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return value
            raise ValueError(f"config has none of {names}")

        hidden = pick("hidden_size", "n_embd")
        heads = pick("num_attention_heads", "n_head")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            hidden_size=hidden,
            num_layers=pick("num_hidden_layers", "num_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=pick("intermediate_size", "n_inner"),
            vocab_size=pick("vocab_size"),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block, by its Llama name."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def matmul_params(self) -> int:
        """Weights used in matrix products per token: every block's linear layers plus the output head."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size

    def lora_params(self, r: int, targets: Iterable[str] | str = ATTENTION_PROJECTIONS) -> int:
        """Trainable LoRA weights for rank r on the named projections (`all-linear`: all seven)."""
        shapes = self.linear_shapes()
        names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
        return self.num_layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def attention_context(lengths: Sequence[int]) -> float:
    """sum(L^2) / sum(L): the mean causal context a token attends over, times two."""
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


def flops_per_token(shape: ModelShape, lora_params: int, lengths: Sequence[int]) -> float:
    """Model FLOPs per useful token of one training step.

    Frozen matmuls cost 4 FLOPs per weight (forward, and the gradient of the input; no weight gradient),
    LoRA weights 6 (forward, input and weight gradients), and causal attention 6 * heads * head_dim * L per
    token per layer for a sequence of length L (QK^T and AV over half the L x L square, forward plus a backward
    twice as costly). Recomputation (checkpointing, Flash's backward) is not counted: it is overhead.
    """
    attn = 6 * shape.num_layers * shape.num_heads * shape.head_dim * attention_context(lengths)
    return 4 * shape.matmul_params + 6 * lora_params + attn


def mfu(tokens_per_second: float, flops_per_useful_token: float, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation, 0..1."""
    return tokens_per_second * flops_per_useful_token / peak_flops
