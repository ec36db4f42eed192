"""Varlen attention computes what the model computes (issue 17, item 7), on the CPU: whatever the kernel does
not cover (dropout, a sliding window shorter than a sequence, softcapping, sinks, the CPU itself) runs over a
mask built from the packed row's boundaries, so examples never attend to each other; and `configure` keeps
varlen off models whose attention it would not reproduce. The kernel itself is checked on the GPU
(tests/gpu/test_exaone_format.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from qlora_trainer import speed  # noqa: E402

LENGTHS = (5, 3, 4)


def packed_inputs(seed: int = 0, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    q = torch.randn(1, heads, n, dim, generator=generator)
    k = torch.randn(1, kv_heads, n, dim, generator=generator)
    v = torch.randn(1, kv_heads, n, dim, generator=generator)
    positions = torch.cat([torch.arange(length) for length in LENGTHS])[None]
    return q, k, v, positions


def module(heads: int = 4, kv_heads: int = 2):
    return SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads, training=True)


def reference(q, k, v, window=None):
    """Each sequence alone, causal (and within `window` keys back), expanded heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs, start = [], 0
    for length in LENGTHS:
        part = slice(start, start + length)
        i = torch.arange(length)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[None, :] > i[:, None] - window
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(q[:, :, part], k[:, :, part], v[:, :, part], attn_mask=allowed)
        )
        start += length
    return torch.cat(outs, 2).transpose(1, 2)


def test_a_packed_row_off_the_kernel_attends_within_each_example():
    q, k, v, positions = packed_inputs()
    out, _ = speed.varlen_attention_forward(module(), q, k, v, None, position_ids=positions)
    assert torch.allclose(out, reference(q, k, v), atol=1e-5)


def test_a_sliding_window_shorter_than_an_example_is_kept():
    q, k, v, positions = packed_inputs(1)
    out, _ = speed.varlen_attention_forward(module(), q, k, v, None, position_ids=positions, sliding_window=2)
    assert torch.allclose(out, reference(q, k, v, window=2), atol=1e-5)
    assert not torch.allclose(out, reference(q, k, v), atol=1e-3)  # the window did change it


def test_boundaries_from_the_collators_kwargs_count_as_the_position_ids_do():
    q, k, v, positions = packed_inputs(2)
    cu = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
    out, _ = speed.varlen_attention_forward(module(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5)
    assert torch.allclose(out, reference(q, k, v), atol=1e-5)


def test_attention_dropout_never_lets_an_example_see_another():
    q, k, v, positions = packed_inputs(3)
    outs = []
    for scale in (1.0, 100.0):
        v2 = v.clone()
        v2[:, :, : LENGTHS[0]] *= scale  # the first example changes; causally, the later ones could see it
        torch.manual_seed(0)  # the same dropout draw
        out, _ = speed.varlen_attention_forward(module(), q, k, v2, None, dropout=0.5, position_ids=positions)
        outs.append(out[:, LENGTHS[0] :])
    assert torch.equal(outs[0], outs[1])


def test_softcapping_runs_the_models_own_eager_attention_per_example():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    speed.register_varlen_attention()
    config = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=3, attn_logit_softcapping=5.0, final_logit_softcapping=None,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    assert speed.varlen_refused(model, 1024) == "logit softcapping"
    ids = torch.randint(0, 64, (1, sum(LENGTHS)))
    positions = torch.cat([torch.arange(length) for length in LENGTHS])[None]
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        alone = torch.cat(
            [model(input_ids=part).logits for part in ids.split(list(LENGTHS), dim=1)], dim=1
        )
        model.config._attn_implementation = speed.VARLEN
        packed = model(input_ids=ids, position_ids=positions).logits
    assert torch.allclose(packed, alone, atol=1e-5)


def test_attention_sinks_run_the_models_own_eager_attention_per_example():
    from transformers import GptOssConfig, GptOssForCausalLM

    speed.register_varlen_attention()
    config = GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_()  # away from zero, so they count
    assert speed.varlen_refused(model, 1024) == "attention sinks"
    ids = torch.randint(0, 64, (1, sum(LENGTHS)))
    positions = torch.cat([torch.arange(length) for length in LENGTHS])[None]
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        alone = torch.cat([model(input_ids=part).logits for part in ids.split(list(LENGTHS), dim=1)], dim=1)
        model.config._attn_implementation = speed.VARLEN
        packed = model(input_ids=ids, position_ids=positions).logits
    assert torch.allclose(packed, alone, atol=1e-5)


def test_varlen_is_refused_where_it_would_compute_something_else():
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    assert speed.varlen_refused(LlamaForCausalLM(LlamaConfig(**small)), 1024) is None
    assert speed.varlen_refused(LlamaForCausalLM(LlamaConfig(**small, attention_dropout=0.1)), 1024) == "attention dropout"
    mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=4096))  # Mistral-7B-v0.1's window
    assert speed.varlen_refused(mistral, 1024) is None  # no example is longer than the window
    assert speed.varlen_refused(mistral, 8192) == "sliding window"
    qwen_off = Qwen2ForCausalLM(Qwen2Config(**small, sliding_window=4096, use_sliding_window=False))
    assert speed.varlen_refused(qwen_off, 8192) is None
    qwen_on = Qwen2ForCausalLM(Qwen2Config(**small, sliding_window=512, use_sliding_window=True, max_window_layers=0))
    assert speed.varlen_refused(qwen_on, 1024) == "sliding window"


def test_the_kernel_is_chosen_only_for_what_it_computes():
    cuda_q = SimpleNamespace(is_cuda=True)
    assert speed.varlen_unsupported(cuda_q, 8, 8, 0.0, 5, {}) is None
    assert speed.varlen_unsupported(cuda_q, 8, 8, 0.0, 5, {"sliding_window": 5}) is None
    assert speed.varlen_unsupported(cuda_q, 8, 8, 0.0, 5, {"sliding_window": 4}) == "a sliding window shorter than a sequence"
    assert speed.varlen_unsupported(cuda_q, 8, 8, 0.1, 5, {}) == "attention dropout"
    assert speed.varlen_unsupported(cuda_q, 8, 8, 0.0, 5, {"softcap": 50.0}) == "logit softcapping"
    assert speed.varlen_unsupported(cuda_q, 8, 8, 0.0, 5, {"s_aux": object()}) == "attention sinks"
    assert speed.varlen_unsupported(cuda_q, 1, 8, 0.0, 5, {}) == "a key longer than the query"
    assert speed.varlen_unsupported(SimpleNamespace(is_cuda=False), 8, 8, 0.0, 5, {}) == "not on a GPU"
