"""Varlen attention: PyTorch's Flash varlen kernel over packed rows (each example its own causal sequence, no
mask, cost growing with each example's square rather than the row's), registered with transformers as
"varlen", and chosen only where it computes what the model computes (`varlen_refused`, `varlen_unsupported`).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from .packing import VARLEN, _masked_attention, packed_boundaries


def _cuda_device(device: Any) -> bool:
    return str(device).startswith("cuda")


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def choose_attention(device: Any) -> str:
    """The attention implementation for training on `device`.

    On a CUDA GPU of compute capability 8.0 or later with PyTorch's varlen Flash attention: "varlen", which
    runs each packed example as its own causal sequence with no mask at all (cost grows with each example's
    square, not the packed row's). Otherwise "sdpa": transformers builds a block-causal mask from the
    restarting position ids, which is right but quadratic in the row.
    """
    if not _cuda_device(device):
        return "sdpa"
    import torch

    if not torch.cuda.is_available() or _varlen_fn() is None:
        return "sdpa"
    index = torch.device(device).index or 0
    if torch.cuda.get_device_capability(index) < (8, 0):
        return "sdpa"
    register_varlen_attention()
    return VARLEN


_REGISTERED = False


def register_varlen_attention() -> None:
    """Register "varlen" with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    # The flash mask keeps only a 2D padding mask (or None): no dense 4D mask is ever built.
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    _REGISTERED = True
    import torch

    if torch.cuda.is_available() and _varlen_fn() is not None:
        _varlen_call()


_VARLEN_CALL: tuple[Any, dict[str, Any], bool, bool] | None = None


def _varlen_call() -> tuple[Any, dict[str, Any], bool, bool]:
    """(the varlen function, its causal keyword arguments, whether it takes fewer key/value heads natively,
    whether it takes a softmax scale): `_flash_varlen` where it gives what varlen_attn gives, else varlen_attn.

    Worked out once, outside any traced code."""
    global _VARLEN_CALL
    if _VARLEN_CALL is None:
        public = _public_varlen_call()
        _VARLEN_CALL = (_flash_varlen, {}, True, True) if _flash_varlen_matches(public) else public
    return _VARLEN_CALL


def _public_varlen_call() -> tuple[Any, dict[str, Any], bool, bool]:
    """varlen_attn and how to call it: PyTorch 2.10/2.11 spell causal `is_causal=True`, later versions
    `window_size=(-1, 0)` and add `enable_gqa`."""
    fn = _varlen_fn()
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return (fn, kwargs, "enable_gqa" in params or _gqa_probe(fn, kwargs), "scale" in params)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None = None):
    """The Flash varlen kernel that varlen_attn runs, called as its aten operator, causal: that operator's
    backward is autograd's own, in C++, where varlen_attn's Python custom operator costs host time forward and
    backward in every block. Flash takes fewer key/value heads natively."""
    import torch

    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)[0]


def _flash_varlen_matches(public: tuple[Any, dict[str, Any], bool, bool]) -> bool:
    """Whether `_flash_varlen` gives varlen_attn's output and gradients on two packed sequences with grouped
    key/value heads (a PyTorch whose private operator changed is refused and keeps varlen_attn)."""
    import torch

    fn, kwargs, gqa_native, _ = public
    try:
        generator = torch.Generator(device="cuda").manual_seed(0)
        shapes = ((12, 4, 64), (12, 2, 64), (12, 2, 64))
        leaves = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=generator) for s in shapes]
        cu = torch.tensor([0, 5, 12], device="cuda", dtype=torch.int32)
        results = []
        for call in (_flash_varlen, lambda q, k, v, *rest: fn(q, k, v, *rest, **kwargs)):
            q, k, v = (t.detach().clone().requires_grad_(True) for t in leaves)
            kk, vv = (k, v) if gqa_native else (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
            out = call(q, kk, vv, cu, cu, 7, 7)
            out.float().square().sum().backward()
            results.append([out, q.grad, k.grad, v.grad])
        return all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(*results))
    except Exception:  # noqa: BLE001 - any refusal means: use varlen_attn
        return False


def _gqa_probe(fn: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this PyTorch's varlen op already accepts fewer key/value heads than query heads."""
    import torch

    try:
        q = torch.randn(8, 4, 64, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, 8], device="cuda", dtype=torch.int32)
        out = fn(q, kv, kv, cu, cu, 8, 8, **kwargs)
        full = kv.repeat_interleave(2, 1).transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), full, full, is_causal=True)
        return bool(torch.allclose(out.float(), ref.transpose(0, 1).float(), atol=2e-2, rtol=2e-2))
    except Exception:  # noqa: BLE001 - any refusal means: expand the heads ourselves
        return False


def _call_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None):
    """PyTorch's varlen Flash attention over (tokens, heads, dim), causal within each sequence."""
    fn, kwargs, gqa_native, takes_scale = _VARLEN_CALL or _varlen_call()
    if k.shape[1] != q.shape[1] and not gqa_native:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    # The default scale is 1/sqrt(head_dim), what Llama-family models use; only a different one is passed.
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        if not takes_scale:
            raise NotImplementedError("this PyTorch's varlen attention has no scale argument; use sdpa")
        kwargs = {**kwargs, "scale": scale}
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function over packed rows: query/key/value are (batch, heads, seq, dim).

    Sequence boundaries come from `cu_seq_lens_q`/`max_length_q` (transformers' DataCollatorWithFlattening with
    `return_flash_attn_kwargs=True`), else from position ids restarting at 0 in a one-row batch; otherwise
    every row is one sequence, and with a 2D padding mask the padding is dropped first. Whatever the kernel
    does not compute as the model does runs `_masked_attention` instead, over a mask built from the same
    boundaries: the CPU, a key longer than the query (generation with a cache), attention dropout, a sliding
    window shorter than a sequence, logit softcapping and attention sinks.
    """
    import torch

    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None and batch == 1 and q_len == k_len and kwargs.get("position_ids") is not None:
        cu, max_len = packed_boundaries(kwargs["position_ids"])
    unsupported = varlen_unsupported(query, q_len, k_len, dropout, max_len if cu is not None else q_len, kwargs)
    if unsupported:
        return _masked_attention(
            module, query, key, value, attention_mask, dropout, scaling, cu if batch == 1 else None, **kwargs
        )
    q = query.transpose(1, 2)  # (batch, seq, heads, dim)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    if cu is not None and batch == 1:
        cu = cu.to(torch.int32)
        out = _call_varlen(q[0], k[0], v[0], cu, cu, int(max_len), int(max_len), scaling)
        return out.unsqueeze(0), None
    if attention_mask is None:
        cu = torch.arange(0, (batch + 1) * q_len, q_len, device=query.device, dtype=torch.int32)
        rows = lambda t: t.reshape(batch * t.shape[1], *t.shape[2:])  # noqa: E731
        out = _call_varlen(rows(q), rows(k), rows(v), cu, cu, q_len, q_len, scaling)
        return out.view(batch, q_len, *out.shape[1:]), None
    # Padded rows: attend over the real tokens only, scatter back, leave padding positions at zero.
    keep = attention_mask.reshape(-1).bool()
    index = keep.nonzero().squeeze(1)
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max())
    flat = lambda t: t.reshape(batch * t.shape[1], *t.shape[2:]).index_select(0, index)  # noqa: E731
    out = _call_varlen(flat(q), flat(k), flat(v), cu, cu, max_len, max_len, scaling)
    full = out.new_zeros(batch * q_len, *out.shape[1:]).index_copy(0, index, out)
    return full.view(batch, q_len, *out.shape[1:]), None


def varlen_unsupported(query: Any, q_len: int, k_len: int, dropout: float, longest: Any, kwargs: dict) -> str | None:
    """Why the varlen kernel would not compute what the model computes for this call, else None.

    The kernel is causal within each sequence and nothing else: a sliding window (Mistral, Qwen2 with a window,
    Gemma-2/3's local layers) changes the result only for a sequence longer than the window; softcapping
    (Gemma-2) and sinks (gpt-oss) always do."""
    if not query.is_cuda:
        return "not on a GPU"
    if q_len != k_len:
        return "a key longer than the query"
    if dropout:
        return "attention dropout"
    if kwargs.get("softcap") is not None:
        return "logit softcapping"
    if kwargs.get("s_aux") is not None:
        return "attention sinks"
    window = kwargs.get("sliding_window")
    if window is not None and int(longest) > window:
        return "a sliding window shorter than a sequence"
    return None


def varlen_refused(model: Any, max_length: int) -> str | None:
    """What of `model`'s attention the varlen kernel would not compute on packed rows of at most `max_length`
    tokens, else None. Such a model keeps the attention it was loaded with (whose masks transformers builds
    from the packed position ids): under varlen, every call would take `_masked_attention`, right but with a
    mask quadratic in the row. A window at least `max_length` long never cuts a sequence (Mistral-7B-v0.1's 4096
    at the default 1024), so it does not count."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "logit softcapping"
    windows = []
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            return "attention sinks"
        if "sliding_window" in vars(module) or hasattr(type(module), "sliding_window"):
            windows.append(module.sliding_window)
    if not windows:  # Mistral passes its config's window to attention; Qwen2-style models set it per module
        windows.append(getattr(config, "sliding_window", None))
    if any(window is not None and window < max_length for window in windows):
        return "sliding window"
    return None
