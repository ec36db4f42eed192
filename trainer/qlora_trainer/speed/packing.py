"""Packed rows: the example boundaries of a packed row (from position ids restarting at 0), handed to the decoder
stack once per forward, and the masked attention every call the varlen kernel does not cover runs instead: the
model's own attention over a mask built from those boundaries, so examples never attend to each other.
"""

from __future__ import annotations

from typing import Any


VARLEN = "varlen"


def _masked_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float, scaling: float | None,
    cu: Any, **kwargs: Any,
) -> tuple[Any, Any]:
    """The model's own attention over an explicit mask: causal, within each packed sequence (`cu`, the
    boundaries of a one-row batch) or row, within a sliding window where the call has one, and without padding.

    Softcapping and sinks run the model's own eager function (SDPA has neither); the rest SDPA, which takes
    dropout and a boolean mask. The mask is quadratic in the row: the price of computing what the model does."""
    import sys

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = _block_mask(query, key.shape[2], cu, attention_mask, kwargs.get("sliding_window"))
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__}: softcapping or sinks without an eager attention")
        additive = query.new_zeros(mask.shape).masked_fill_(~mask, torch.finfo(query.dtype).min)  # eager adds it
        return eager(module, query, key, value, additive, dropout=dropout, scaling=scaling, **kwargs)
    kwargs.pop("sliding_window", None)  # in the mask
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _block_mask(query: Any, k_len: int, cu: Any, mask_2d: Any, window: int | None) -> Any:
    """Boolean (batch, 1, q, k) mask: causal (the last query aligned with the last key), within the sequence
    each position belongs to (`cu`: boundaries of a one-row batch), within `window` keys back (a key is
    seen when it is less than `window` positions behind, as transformers' sliding-window mask), and over the
    2D padding mask's real keys."""
    import torch

    q_len = query.shape[2]
    device = query.device
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len, device=device)[None, :]
    allowed = cols <= rows
    if window is not None:
        allowed = allowed & (cols > rows - window)
    if cu is not None:
        # The sequence index of each key position (queries are the last q_len of them).
        seq = torch.bucketize(torch.arange(k_len, device=device), cu.to(device)[1:-1].long(), right=True)
        allowed = allowed & (seq[k_len - q_len :][:, None] == seq[None, :])
    allowed = allowed[None, None].expand(query.shape[0], 1, q_len, k_len)
    if mask_2d is not None and mask_2d.dim() == 2:
        allowed = allowed & mask_2d[:, None, None, -k_len:].bool()
    elif mask_2d is not None:  # a 4D mask some caller built: honour it as well
        allowed = allowed & (mask_2d.bool() if mask_2d.dtype == torch.bool else mask_2d == 0)
    return allowed


_BOUNDARIES: list[Any] = [None, None, 0]


def packed_boundaries(position_ids: Any) -> tuple[Any, int]:
    """(cu_seqlens, longest) of a packed row whose position ids restart at 0 for each example.

    For collators that send only position ids (and for rows a trainer cuts at example boundaries). Worked out
    once per forward: every block gets the same tensor, which the cache holds (so its id cannot be reused)."""
    import torch

    if _BOUNDARIES[0] is position_ids:
        return _BOUNDARIES[1], _BOUNDARIES[2]
    row = position_ids[0]
    starts = (row == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_full((1,), row.numel())]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    _BOUNDARIES[:] = [position_ids, cu, longest]
    return cu, longest


def install_packed_boundaries(model: Any) -> int:
    """Hand the decoder stack the example boundaries of a packed row once per forward, as the flash kwargs.

    A forward pre-hook on each module that holds the decoder blocks turns position ids that restart at 0 into
    `cu_seq_lens_q/k` and `max_length_q/k` (one host sync a forward, outside any compiled block), so collators
    that send only position ids, and rows a trainer cuts at example boundaries, reach varlen attention with
    the right boundaries. Returns the number of hooks installed."""
    import torch

    def hook(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is None or positions.dim() != 2 or positions.shape[0] != 1 or "cu_seq_lens_q" in kwargs:
            return None
        if getattr(module.config, "_attn_implementation", None) != VARLEN:
            return None
        cu, longest = packed_boundaries(positions)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return args, kwargs

    count = 0
    for module in model.modules():
        layers = getattr(module, "layers", None)
        stack = isinstance(layers, torch.nn.ModuleList) and hasattr(module, "config")
        if stack and not getattr(module, "_qlora_boundaries", False):
            module.register_forward_pre_hook(hook, with_kwargs=True)
            module._qlora_boundaries = True
            count += 1
    return count
