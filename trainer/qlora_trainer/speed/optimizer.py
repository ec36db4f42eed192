"""bitsandbytes' optimizers with less host time: no device sync after every parameter's update where none is
needed, and small parameters updated a bucket at a time with the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator


def drop_optimizer_syncs() -> bool:
    """Keep bitsandbytes' optimizers from synchronising the whole device after every parameter's update (240
    times a step for LoRA on q/k/v/o of 30 blocks), which holds the host back from issuing the next step while
    the GPU finishes this one. Their update kernels run on the CUDA default stream, in order with the rest of a
    step issued there, so the wait is needed only for paged states (unified memory, migrated asynchronously) or
    when the caller works on another stream (`optimizer_sync_needed`); it stays for those. bitsandbytes PR #2050
    proposes the same. Idempotent; False without bitsandbytes."""
    try:
        import bitsandbytes.optim.optimizer as bnb_optimizer
        from bitsandbytes.functional import GlobalPageManager
    except ImportError:
        return False
    if getattr(bnb_optimizer.sync_gpu, "_qlora_original", None) is not None:
        return True
    import torch

    original = bnb_optimizer.sync_gpu
    pages = GlobalPageManager.get_instance()

    def sync_gpu(tensor: Any) -> None:
        cuda = tensor.device.type == "cuda"
        stream = torch._C._cuda_getCurrentRawStream(tensor.device.index) if cuda else None
        if optimizer_sync_needed(tensor.device.type, len(pages.paged_tensors), stream):
            original(tensor)

    sync_gpu._qlora_original = original
    bnb_optimizer.sync_gpu = sync_gpu
    return True


def optimizer_sync_needed(device_type: str, paged_tensors: int, stream: int | None) -> bool:
    """Whether a bitsandbytes optimizer update must be waited for: anywhere but CUDA (its own rules), while any
    state is paged, or when the caller's current stream is not the default one (0) that the update runs on."""
    return device_type != "cuda" or paged_tensors > 0 or stream != 0


# bitsandbytes keeps a state in unified (paged) memory from this many elements (optim/optimizer.py,
# `get_state_buffer`), its 8-bit states in blocks of 256 elements each with its own scale, and parameters under
# `min_8bit_size` elements in 32 bits.
BNB_PAGED_FROM = 100_000


BNB_BLOCK = 256


# bitsandbytes updates whose arithmetic is element by element (per 256-element block for 8-bit states): one
# over a concatenation is the updates of its parts. LAMB and LARS scale by per-tensor norms, AdEMAMix keeps
# states of another layout: left out.
ELEMENTWISE_BNB_UPDATES = frozenset({"adam", "lion", "momentum", "rmsprop"})


@dataclass
class ParameterBucket:
    """Parameters that the optimizer updates as one: `flat` holds their values, each member's data is a view
    into it, and `gather_grads` copies their gradients into `flat.grad` before each update."""

    flat: Any
    members: list

    def spans(self) -> Iterator[tuple[Any, int]]:
        """Each member with where its elements start in `flat`."""
        start = 0
        for member in self.members:
            yield member, start
            start += member.numel()

    def intact(self) -> bool:
        """Whether every member's data is still its view into `flat` (a `module.to()` that copies, say, would
        leave the optimizer updating a bucket that nothing reads)."""
        at, size = self.flat.data_ptr(), self.flat.element_size()
        return all(member.data_ptr() == at + start * size for member, start in self.spans())

    def gather_grads(self) -> None:
        """The members' gradients into the bucket's; none if no member has one (the optimizer skips it, as it
        would skip each member). Only for all or none: with some, the buckets are split (`split_buckets`)."""
        import torch

        if self.members[0].grad is None:
            self.flat.grad = None
            return
        if self.flat.grad is None:
            self.flat.grad = torch.empty_like(self.flat)
        torch.cat([m.grad.reshape(-1) for m in self.members], out=self.flat.grad)


def clear_grads(params: Iterable[Any], set_to_none: bool = True) -> None:
    """What `zero_grad` does to each parameter's gradient, for the parameters given."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            p.grad.detach_().requires_grad_(False)
            p.grad.zero_()


def bucket_optimizer_parameters(optimizer: Any) -> list[ParameterBucket]:
    """Let a bitsandbytes optimizer update its parameters a bucket at a time instead of one at a time; returns
    the buckets (none where it does not apply).

    bitsandbytes' optimizers run a Python loop over the parameters (240 LoRA tensors for q/k/v/o of 30 blocks),
    each update a few dozen microseconds of host time for a kernel of a few: 10-17 ms of a host-bound step.
    Here each group's parameters of one dtype and device become views into one flat bucket, and the group holds
    the bucket. The arithmetic is the same: the update is element by element (`ELEMENTWISE_BNB_UPDATES`), every
    member starts a new 256-element block of the 8-bit state (only members of a multiple of 256 elements are
    taken), members keep the state size they had (8 bits: only members of at least `min_8bit_size`) and the
    place: a paged optimizer pages only states from `BNB_PAGED_FROM` elements, so members below it are taken and
    the bucket's states are kept in device memory as theirs were. Before each step a hook copies the members'
    gradients into the bucket's; a step where only some members of a bucket have one splits the buckets back
    into their members, states and all (`split_buckets`), so that those without are skipped as they would be.
    The optimizer's `zero_grad` clears the members' gradients too. Only before the first step, without
    per-parameter overrides (bitsandbytes keys some by position, which buckets change), and without `max_unorm`
    (a per-tensor norm)."""
    try:
        from bitsandbytes.optim.optimizer import GlobalOptimManager, Optimizer8bit
    except ImportError:
        return []
    import torch

    name = getattr(optimizer, "optimizer_name", None)
    if not isinstance(optimizer, Optimizer8bit) or name not in ELEMENTWISE_BNB_UPDATES or optimizer.state:
        return []
    manager = GlobalOptimManager.get_instance()
    if getattr(optimizer.args, "max_unorm", 0.0) > 0.0 or manager.index2config:
        return []
    overridden = set(manager.pid2config) | {id(getattr(m, attr)) for m, attr, _ in manager.module_weight_config_triple}
    min_8bit, paged = optimizer.args.min_8bit_size, optimizer.is_paged

    def taken(param: Any) -> bool:
        n = param.numel()
        if getattr(param, "_qlora_bucket", False) or id(param) in overridden or not param.is_contiguous():
            return False
        return n % BNB_BLOCK == 0 and n >= min_8bit and not (paged and n >= BNB_PAGED_FROM)

    buckets: list[ParameterBucket] = []
    original = [list(group["params"]) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        kept, takers = [], {}
        for param in group["params"]:
            if taken(param):
                takers.setdefault((param.dtype, param.device), []).append(param)
            else:
                kept.append(param)
        for members in takers.values():
            if len(members) == 1:
                kept.extend(members)
                continue
            bucket = ParameterBucket(torch.nn.Parameter(torch.cat([m.detach().reshape(-1) for m in members])), members)
            bucket.flat._qlora_bucket = True  # never bucketed again: its members' views would be left behind
            for member, start in bucket.spans():
                member.data = bucket.flat.data[start : start + member.numel()].view_as(member)
            buckets.append(bucket)
            kept.append(bucket.flat)
        group["params"] = kept
    if buckets:
        _attach_buckets(optimizer, buckets, original)
    return buckets


def _attach_buckets(optimizer: Any, buckets: list[ParameterBucket], original: list[list]) -> None:
    """The hooks that keep a bucketed optimizer doing what it did per parameter: gradients gathered before each
    step (or every bucket split, when some member of one has none or is no longer a view into it), states of
    buckets kept out of paged memory, members' gradients cleared by `zero_grad`. `optimizer._qlora_buckets` are
    the buckets in use and `optimizer._qlora_original` each group's parameters as they were."""
    import torch

    optimizer._qlora_buckets, optimizer._qlora_original = buckets, original

    def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        if any(len({m.grad is None for m in b.members}) > 1 or not b.intact() for b in buckets):
            split_buckets(optimizer)
        for bucket in buckets:
            bucket.gather_grads()

    optimizer.register_step_pre_hook(before_step)
    own_state_buffer, own_zero_grad = optimizer.get_state_buffer, optimizer.zero_grad

    def get_state_buffer(p: Any, dtype: Any = torch.float32) -> Any:
        if getattr(p, "_qlora_bucket", False):  # as its members' would be: each is below the paging size
            return torch.zeros_like(p, dtype=dtype, device=p.device)
        return own_state_buffer(p, dtype=dtype)

    def zero_grad(set_to_none: bool = True) -> None:
        own_zero_grad(set_to_none)
        clear_grads((m for b in buckets for m in b.members), set_to_none)

    optimizer.get_state_buffer = get_state_buffer
    optimizer.zero_grad = zero_grad


def split_buckets(optimizer: Any) -> int:
    """Undo the buckets of an optimizer (or of an accelerate wrapper's): each group holds its parameters as it
    did before, in the same order, each with its slice of its bucket's state (members start on 8-bit block
    boundaries, so every state and scale slices exactly), and each is updated on its own from here on. For a
    step where some member of a bucket has no gradient (the per-tensor optimizer skips it) or is no longer a view
    into it, and for a checkpoint of per-tensor state. bitsandbytes' overrides keyed by position are worked out
    again for the positions restored. Returns how many buckets."""
    inner = _unwrapped(optimizer)
    buckets = getattr(inner, "_qlora_buckets", [])
    count = len(buckets)
    for bucket in buckets:
        state = inner.state.pop(bucket.flat, None)
        for member, start in bucket.spans() if state else ():
            inner.state[member] = {
                key: _state_slice(key, value, start, member, bucket.flat.numel()) for key, value in state.items()
            }
        bucket.flat.grad = None
    if count:
        for group, params in zip(inner.param_groups, inner._qlora_original):
            group["params"] = list(params)
        buckets.clear()
        if inner.initialized:  # its first step mapped module overrides to the bucketed positions
            from bitsandbytes.optim.optimizer import GlobalOptimManager

            GlobalOptimManager.get_instance().index2config.clear()  # empty before bucketing (or none are made)
            inner.check_overrides()
    return count


def per_tensor_group_sizes(optimizer: Any) -> list[int] | None:
    """How many parameters each group of a bucketed optimizer (or of an accelerate wrapper's) holds with its
    buckets split, as a checkpoint of per-tensor state has them; None when nothing is bucketed."""
    inner = _unwrapped(optimizer)
    if not getattr(inner, "_qlora_buckets", None):
        return None
    return [len(params) for params in inner._qlora_original]


def bucket_states_fit(optimizer: Any) -> bool:
    """Whether every bucket's loaded state has the bucket's size (a checkpoint of another layout that happens to
    have as many parameters per group would not: bitsandbytes' kernels would read past it)."""
    inner = _unwrapped(optimizer)
    for bucket in getattr(inner, "_qlora_buckets", []):
        state1 = inner.state.get(bucket.flat, {}).get("state1")
        if state1 is not None and state1.numel() != bucket.flat.numel():
            return False
    return True


def _unwrapped(optimizer: Any) -> Any:
    """The optimizer an accelerate `AcceleratedOptimizer` wraps (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _state_slice(key: str, value: Any, start: int, member: Any, total: int) -> Any:
    """A member's part of one entry of a bucket's optimizer state."""
    import torch

    if not isinstance(value, torch.Tensor) or key.startswith("qmap"):
        return value  # the step count; the quantization maps all states share
    n = member.numel()
    if value.numel() == total:
        return value.reshape(-1)[start : start + n].clone().view_as(member)
    if key.startswith("absmax"):
        return value[start // BNB_BLOCK : (start + n) // BNB_BLOCK].clone()
    raise RuntimeError(f"optimizer state {key!r} of shape {tuple(value.shape)}: no way to split it by parameter")
