"""CUDA graphs of a model's decoder blocks, for packed training micro-batches.

A packed QLoRA step of EXAONE-2.4B's shape issues about three thousand kernels, forward and backward, and on
one H100/H200 the host takes longer to issue them than the GPU takes to run them (bench/RESULTS.md). Captured
as CUDA graphs, the blocks' forward and their backward are one launch each. The embedding, the rotary tables,
the final norm and the loss stay eager (Liger's fused loss reads the label count back, which a graph cannot).

A graph has fixed shapes and addresses, so a micro-batch is padded before its blocks run:

- to a multiple of `granularity` tokens (never past the plan's token budget), the added tokens one more
  sequence that attends only to itself: the blocks work on each token alone or within its sequence, so the
  real tokens' outputs are what they are without it, and the added outputs are dropped (no gradient reaches
  them, so none of it reaches the weights);
- its sequence boundaries to a fixed count with empty sequences, and the longest-sequence bound to `max_length`.

One forward and one backward graph are captured for each padded size the first time it comes (a run of the
bench's data meets about ten), all in one memory pool: one micro-batch's activations live at a time, as
in eager mode. The backward graph adds the blocks' LoRA gradients into `.grad` buffers of its own, which it
attaches to the parameters (zeroed where the Trainer had set the gradient to None), as autograd would.

Whatever the graphs do not cover runs the blocks eagerly, as before, and the first time says why: evaluation
(no gradients), a padding mask, a tensor of the row's length that the graphs do not know, checkpointing,
hooks on the blocks, several processes (DDP reduces gradients from autograd's accumulation, which the graphs
bypass), a second forward before the first one's backward (it would overwrite what that backward reads). A
tensor of the blocks that moved (the optimizer's bucket makes the LoRA weights views into it) drops the captured
graphs; a capture that fails, or more than `MAX_CAPTURES` sizes, stops them for the run and frees their memory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

# Tokens a micro-batch is padded to a multiple of: half of it is wasted on average, each size costs a capture.
GRANULARITY = 512
# Sequence boundaries are padded to a multiple of this many sequences (the real ones plus the padding's).
SEQUENCE_SLOTS = 8
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
LENGTH_KEYS = ("max_length_q", "max_length_k")
CONSTANTS = (type(None), bool, int, float, str)
# More padded sizes than this means something in the key changes call by call: the graphs stop, memory is freed.
MAX_CAPTURES = 64


def padded_tokens(tokens: int, granularity: int, limit: int) -> int:
    """The length a micro-batch of `tokens` runs at: the next multiple of `granularity`, not past `limit`
    (the plan's token budget), and never shorter than the micro-batch itself."""
    rounded = -(-tokens // granularity) * granularity
    return max(tokens, min(rounded, limit))


def boundary_slots(sequences: int) -> int:
    """Sequences the padded boundaries hold: the real ones and the padding's, rounded up to `SEQUENCE_SLOTS`."""
    return -(-(sequences + 1) // SEQUENCE_SLOTS) * SEQUENCE_SLOTS


class Refused(Exception):
    """This call cannot replay a graph; the message says why (it runs eagerly)."""


@dataclass(frozen=True)
class Arguments:
    """How a blocks call's keyword arguments map onto a graph's static inputs (worked out from shapes and types
    only, nothing read back from the GPU)."""

    per_token: tuple[tuple[str, int], ...]  # (name, index in a tuple or -1): tensors of (1, tokens, ...)
    boundaries: tuple[str, ...]
    lengths: tuple[str, ...]
    statics: tuple[str, ...]  # other tensors: copied as they are (their shape is part of the graph's key)
    constants: tuple[tuple[str, Any], ...]
    layout: tuple  # dtypes and shapes past the token dimension, for the key

    @staticmethod
    def of(kwargs: dict[str, Any], tokens: int) -> Arguments:
        """Sort `kwargs` of a call over a packed row of `tokens` tokens; `Refused` for what a graph cannot take."""
        per_token, boundaries, lengths, statics, constants, layout = [], [], [], [], [], []
        for name, value in sorted(kwargs.items()):
            if name in BOUNDARY_KEYS:
                if not isinstance(value, torch.Tensor) or value.dim() != 1:
                    raise Refused(f"{name} is not a tensor of sequence boundaries")
                boundaries.append(name)
            elif name in LENGTH_KEYS:
                if not isinstance(value, int):
                    raise Refused(f"{name} is not an int")
                lengths.append(name)
            elif name == "attention_mask" and value is not None:
                raise Refused("a padding mask (only packed rows without one replay)")
            elif isinstance(value, torch.Tensor):
                if _per_token(value, tokens):
                    per_token.append((name, -1))
                    layout.append((name, value.dtype, tuple(value.shape[2:])))
                elif tokens in value.shape:
                    raise Refused(f"{name}: a tensor of the row's length in another dimension")
                else:
                    statics.append(name)
                    layout.append((name, value.dtype, tuple(value.shape)))
            elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
                if not all(_per_token(v, tokens) for v in value):
                    raise Refused(f"{name}: a tuple of tensors that are not one per token")
                per_token.extend((name, i) for i in range(len(value)))
                layout.extend((name, v.dtype, tuple(v.shape[2:])) for v in value)
            elif isinstance(value, CONSTANTS):
                constants.append((name, value))
            else:
                raise Refused(f"{name}: a {type(value).__name__}")
        if "cu_seq_lens_q" not in boundaries:
            raise Refused("no sequence boundaries (cu_seq_lens_q)")
        return Arguments(
            tuple(per_token), tuple(boundaries), tuple(lengths), tuple(statics), tuple(constants), tuple(layout)
        )


def _per_token(tensor: Any, tokens: int) -> bool:
    return tensor.dim() >= 2 and tensor.shape[0] == 1 and tensor.shape[1] == tokens


@dataclass
class GraphStats:
    """What the graphs did over a run, for the log and the bench."""

    captured: int = 0
    replayed: int = 0
    eager: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    dropped: int = 0
    refusals: dict[str, int] = field(default_factory=dict)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def describe(self) -> str:
        text = (
            f"{self.replayed} micro-batches replayed, {self.captured} sizes captured, "
            f"{self.padding_fraction:.1%} of their tokens padding, {self.eager} training calls eager"
        )
        if self.refusals:
            text += " (" + "; ".join(f"{reason}: {n}" for reason, n in self.refusals.items()) + ")"
        if self.dropped:
            text += f"; graphs dropped {self.dropped} times (tensors of the blocks moved)"
        return text


@dataclass
class _Capture:
    """One padded size: its two graphs and the static tensors they read and write."""

    padded: int
    forward: Any
    backward: Any
    hidden: Any
    per_token: dict[tuple[str, int], Any]
    statics: dict[str, Any]
    boundaries: Any
    output: Any
    grad_output: Any
    grad_hidden: Any


class StackGraphs:
    """Runs the decoder blocks of a model over a packed row, from CUDA graphs where it can (module docstring).

    Called in place of the blocks' loop, with the arguments each block gets; returns the last block's output."""

    def __init__(self, layers: list, *, max_length: int, limit: int, granularity: int = GRANULARITY) -> None:
        self.layers = list(layers)
        self._modules = [m for layer in self.layers for m in layer.modules()]
        self.params = self._trainable()
        self.max_length, self.limit, self.granularity = max_length, limit, granularity
        self.stats = GraphStats()
        self.captures: dict[tuple, _Capture] = {}
        self.enabled = True  # off: every call runs eagerly (a benchmark's side-by-side)
        self.disabled: str | None = None  # why the graphs stopped for this run (a capture failed)
        self._pointers: tuple[int, ...] | None = None
        self._pool = self._stream = None
        self._grads: list | None = None  # one buffer per parameter, None for those that get no gradient
        self._pending: Any = None  # a weak reference to the output of a replayed forward awaiting its backward
        self._shared: dict[tuple, Any] = {}
        self._warm = False

    # ---------------------------------------------------------------- the call

    def __call__(self, hidden: Any, **kwargs: Any) -> Any:
        try:
            plan = self._plan(hidden, kwargs)
        except Refused as refused:
            return self._eager(hidden, kwargs, str(refused))
        if plan is None:
            return self._eager(hidden, kwargs, None)
        arguments, tokens, padded, slots, longest = plan
        self._follow_tensors()
        key = self._key(hidden, arguments, padded, slots, longest)
        capture = self.captures.get(key)
        if capture is None:
            if len(self.captures) >= MAX_CAPTURES:
                self._stop(f"more than {MAX_CAPTURES} padded sizes (a key that changes call by call?)")
                return self._eager(hidden, kwargs, None)
            try:
                capture = self._capture(hidden, kwargs, arguments, padded, slots, longest)
            except Exception as error:  # noqa: BLE001 - a capture that fails leaves the eager blocks, said once
                self._stop(f"capture failed: {type(error).__name__}: {error}")
                return self._eager(hidden, kwargs, None)
            self.captures[key] = capture
        else:
            self._fill(capture, hidden, kwargs, tokens)
        self.stats.replayed += 1
        self.stats.tokens += tokens
        self.stats.padded_tokens += padded
        out = _Replay.apply(self, capture, hidden, *self.params)
        self._pending = weakref.ref(out)
        return out[:, :tokens]

    def _plan(self, hidden: Any, kwargs: dict) -> tuple | None:
        """(arguments, tokens, padded tokens, boundary slots, longest-sequence bound) of a call that can replay;
        None for a call that runs eagerly without a word (no gradients, evaluation), `Refused` for one to say."""
        if not self.enabled or self.disabled or not torch.is_grad_enabled() or not self.layers[0].training:
            return None
        if not hidden.is_cuda or hidden.dim() != 3 or hidden.shape[0] != 1:
            raise Refused("not one packed row on a CUDA device")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise Refused("several processes (DDP reduces gradients as autograd accumulates them)")
        if any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers):
            raise Refused("gradient checkpointing")
        if any(layer._forward_hooks or layer._forward_pre_hooks for layer in self.layers):
            raise Refused("hooks on the blocks")
        if kwargs.get("use_cache") or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise Refused("a KV cache")
        pending = self._pending() if self._pending is not None else None
        if pending is not None:
            # Its backward would read inputs and activations that this call's replay overwrites.
            raise Refused("a second forward before the first one's backward")
        tokens = hidden.shape[1]
        arguments = Arguments.of(kwargs, tokens)
        if any(_tensors_off(value, hidden.device) for value in kwargs.values()):
            raise Refused("a tensor argument on another device (a graph sees only device memory)")
        sequences = kwargs["cu_seq_lens_q"].numel() - 1
        padded = padded_tokens(tokens, self.granularity, self.limit)
        given = max((kwargs[name] for name in arguments.lengths), default=self.max_length)
        return arguments, tokens, padded, boundary_slots(sequences), max(self.max_length, given, padded - tokens)

    def _follow_tensors(self) -> None:
        """Drop the captures when a tensor of the blocks moved or was replaced (the optimizer's bucket makes
        the LoRA weights views into it; `module.to`, a weight cache dropped): a graph reads fixed addresses."""
        pointers = tuple(
            (id(t), t.data_ptr())
            for m in self._modules
            for t in itertools.chain(m._parameters.values(), m._buffers.values())
            if t is not None
        )
        if pointers != self._pointers:
            if self.captures:
                self._drop()
                self.stats.dropped += 1
                log.info("CUDA graphs: tensors of the blocks moved; captured graphs dropped")
            self.params = self._trainable()
            self._grads = None
            self._pointers = pointers

    def _trainable(self) -> list:
        return [p for layer in self.layers for p in layer.parameters() if p.requires_grad]

    def _key(self, hidden: Any, arguments: Arguments, padded: int, slots: int, longest: int) -> tuple:
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        return (padded, slots, longest, hidden.dtype, hidden.shape[2], hidden.requires_grad, autocast,
                arguments.constants, arguments.layout)

    def _eager(self, hidden: Any, kwargs: dict, reason: str | None) -> Any:
        if reason is not None:
            if reason not in self.stats.refusals:
                log.info("CUDA graphs: the blocks run eagerly here: %s", reason)
            self.stats.refusals[reason] = self.stats.refusals.get(reason, 0) + 1
        if torch.is_grad_enabled() and self.layers[0].training:
            self.stats.eager += 1
        return self.run_blocks(hidden, kwargs)

    def run_blocks(self, hidden: Any, kwargs: dict) -> Any:
        for layer in self.layers:
            hidden = layer(hidden, **kwargs)
        return hidden

    def _drop(self) -> None:
        """Forget every capture: the next calls capture again, in a fresh pool."""
        self.captures.clear()
        self._pool = None
        self._pending = None

    def _stop(self, reason: str) -> None:
        """No more graphs this run; their memory goes back to the eager blocks (a capture may have failed for
        want of it)."""
        self.disabled = reason
        log.warning("CUDA graphs off for this run, the blocks run eagerly: %s", reason)
        self._drop()
        self._shared.clear()
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- static inputs

    def _fill(self, capture: _Capture, hidden: Any, kwargs: dict, tokens: int) -> None:
        """Copy this call's inputs into the capture's static tensors; the padding's hidden states are zeroed
        (the rest of its inputs keep whatever an earlier call left: finite, and read by the padding alone). The
        blocks get q's boundaries for k too: packed self-attention, and varlen_attention_forward reads q's."""
        with torch.no_grad():
            capture.hidden[:, :tokens].copy_(hidden)
            capture.hidden[:, tokens:].zero_()
            for (name, index), static in capture.per_token.items():
                value = kwargs[name] if index < 0 else kwargs[name][index]
                static[:, :tokens].copy_(value)
            for name, static in capture.statics.items():
                static.copy_(kwargs[name])
            cu = kwargs["cu_seq_lens_q"]
            capture.boundaries[: cu.numel()].copy_(cu)
            capture.boundaries[cu.numel() :].fill_(capture.padded)

    def _static_kwargs(self, capture: _Capture, kwargs: dict, arguments: Arguments, longest: int) -> dict:
        """The keyword arguments the captured blocks are called with: this capture's static tensors."""
        static = dict(arguments.constants)
        for name, index in arguments.per_token:
            if index < 0:
                static[name] = capture.per_token[(name, -1)]
        for name in {name for name, index in arguments.per_token if index >= 0}:
            static[name] = tuple(capture.per_token[(name, i)] for i in range(len(kwargs[name])))
        static.update(capture.statics)
        static.update({name: capture.boundaries for name in arguments.boundaries})
        static.update({name: longest for name in arguments.lengths})
        return static

    def _shared_buffer(self, name: str, like: Any, tokens: int) -> Any:
        """A (1, tokens, ...) view into one buffer per input, sized for the largest capture so far: every
        capture's static inputs share memory (one micro-batch runs at a time)."""
        key = (name, like.dtype, tuple(like.shape[2:]))
        buffer = self._shared.get(key)
        if buffer is None or buffer.shape[1] < tokens:
            buffer = torch.zeros((1, max(tokens, self.limit), *like.shape[2:]), dtype=like.dtype, device=like.device)
            self._shared[key] = buffer
        return buffer[:, :tokens]

    # ---------------------------------------------------------------- capture

    def _capture(self, hidden: Any, kwargs: dict, arguments: Arguments, padded: int, slots: int,
                 longest: int) -> _Capture:
        device = hidden.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device)
        if self._grads is None:  # allocated outside the capture, which adds into them
            self._grads = [torch.zeros_like(p) for p in self.params]
        capture = _Capture(
            padded=padded, forward=torch.cuda.CUDAGraph(), backward=torch.cuda.CUDAGraph(),
            # A leaf of its own (a view of a shared buffer would not be one) when the blocks' input needs a gradient.
            hidden=(hidden.new_zeros((1, padded, hidden.shape[2])).requires_grad_() if hidden.requires_grad
                    else self._shared_buffer("hidden", hidden, padded)),
            per_token={}, statics={},
            boundaries=torch.full((slots + 1,), padded, dtype=torch.int32, device=device),
            output=self._shared_buffer("output", hidden, padded),
            grad_output=self._shared_buffer("grad_output", hidden, padded), grad_hidden=None,
        )
        for name, index in arguments.per_token:
            value = kwargs[name] if index < 0 else kwargs[name][index]
            capture.per_token[(name, index)] = self._shared_buffer(f"{name}.{index}", value, padded)
        capture.statics = {name: kwargs[name].detach().clone() for name in arguments.statics}
        self._fill(capture, hidden, kwargs, hidden.shape[1])
        static_kwargs = self._static_kwargs(capture, kwargs, arguments, longest)
        wrt = ([capture.hidden] if hidden.requires_grad else []) + self.params

        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), _uncached_autocast():
            if not self._warm:
                # Once, eagerly on the capture stream at a padded size: Triton's kernels for these shapes, cuBLAS's
                # workspace for this stream and autograd's device threads are set up before any capture.
                out = self.run_blocks(capture.hidden, static_kwargs)
                torch.autograd.grad(out, wrt, torch.zeros_like(out), allow_unused=True)
                del out
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()  # the warm-up's cached activations, which the graphs' pool cannot reuse
                self._warm = True
            out = _captured(capture.forward, self._pool, lambda: self._forward_into(capture, static_kwargs))
            backward = lambda: self._backward_into(capture, out, wrt)  # noqa: E731
            grad_hidden, graded = _captured(capture.backward, self._pool, backward)
            capture.grad_hidden = grad_hidden
            del out
        if not self.captures:  # a parameter the blocks leave without a gradient keeps none, as eagerly
            self._grads = [b if g else None for b, g in zip(self._grads, graded)]
        torch.cuda.current_stream(device).wait_stream(stream)
        self.stats.captured += 1
        return capture

    def _forward_into(self, capture: _Capture, static_kwargs: dict) -> Any:
        """The blocks over the static inputs, their output also copied into the capture's (shared) output."""
        out = self.run_blocks(capture.hidden, static_kwargs)
        with torch.no_grad():
            capture.output.copy_(out)
        return out

    def _backward_into(self, capture: _Capture, out: Any, wrt: list) -> Any:
        """The blocks' backward from the static output gradient, the parameters' gradients added into the
        gradient buffers; returns the input's gradient (None when it needs none)."""
        grads = torch.autograd.grad(out, wrt, capture.grad_output, allow_unused=True)
        grad_hidden = None
        if capture.hidden.requires_grad:
            grad_hidden, grads = grads[0], grads[1:]
        if any(b is None and g is not None for b, g in zip(self._grads, grads)):
            raise RuntimeError("this size's blocks give gradients to parameters the first capture's did not")
        pairs = [(buffer, g) for buffer, g in zip(self._grads, grads) if g is not None]
        with torch.no_grad():
            torch._foreach_add_([b for b, _ in pairs], [g for _, g in pairs])
        return grad_hidden, [g is not None for g in grads]

    def attach_grads(self) -> None:
        """Make the graphs' gradient buffers the parameters' `.grad` before a backward replay adds into them: a
        gradient set to None starts from zero, one autograd made elsewhere is carried over."""
        self._pending = None
        zero = []
        for param, buffer in zip(self.params, self._grads):
            grad = param.grad
            if grad is buffer or buffer is None:
                continue
            if grad is None:
                zero.append(buffer)
            else:
                buffer.copy_(grad)
            param.grad = buffer
        if zero:
            torch._foreach_zero_(zero)


def _tensors_off(value: Any, device: Any) -> bool:
    """Whether `value` is, or is a tuple holding, a tensor off `device`."""
    values = value if isinstance(value, tuple) else (value,)
    return any(isinstance(v, torch.Tensor) and v.device != device for v in values)


def _uncached_autocast() -> Any:
    """Autocast as it is, without its cache of weight casts: a cast cached before a capture (by the warm-up) would
    be read by the graph at an address freed when the caller's autocast ends; uncached, each graph casts itself."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _captured(graph: Any, pool: Any, body: Callable[[], Any]) -> Any:
    """`body()` captured into `graph` (in `pool`), on the current stream; a capture that fails is ended before
    its error goes on."""
    graph.capture_begin(pool=pool)
    try:
        result = body()
    except BaseException:
        with contextlib.suppress(Exception):
            graph.capture_end()
        raise
    graph.capture_end()
    return result


class _Replay(torch.autograd.Function):
    """Replays a capture's forward graph; its backward replays the capture's backward graph, which adds the
    parameters' gradients into their `.grad` itself (so none is returned for them). The parameters are inputs
    so that the output needs a gradient."""

    @staticmethod
    def forward(ctx, graphs: StackGraphs, capture: _Capture, hidden: Any, *params: Any) -> Any:
        capture.forward.replay()
        ctx.graphs, ctx.capture, ctx.tokens, ctx.param_count = graphs, capture, hidden.shape[1], len(params)
        return capture.output.detach()

    @staticmethod
    def backward(ctx, grad_output: Any) -> tuple:
        capture = ctx.capture
        ctx.graphs.attach_grads()
        capture.grad_output.copy_(grad_output)
        capture.backward.replay()
        grad_hidden = None if capture.grad_hidden is None else capture.grad_hidden[:, : ctx.tokens].clone()
        return (None, None, grad_hidden) + (None,) * ctx.param_count


class _GraphedLayers:
    """Mixin for the stack's `nn.ModuleList` of blocks: the stack's loop `for block in self.layers[:n]`, over
    all blocks while training, gets one callable that runs them all (`StackGraphs`). Indexing, iteration,
    state dicts and every other use see the blocks as before."""

    def __getitem__(self, index):
        graphs = self.__dict__.get("_qlora_graphs")
        if (
            graphs is not None
            and isinstance(index, slice)
            and range(len(self))[index] == range(len(self))
            and torch.is_grad_enabled()
            and self.training
        ):
            return [graphs]
        return super().__getitem__(index)


def _block_stacks(model: Any) -> Iterator[Any]:
    """Each `nn.ModuleList` of `model` named `layers` that holds its decoder blocks (transformers'
    `GradientCheckpointingLayer`s), in module order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            if all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
                yield layers


def install(model: Any, *, max_length: int, limit: int, granularity: int = GRANULARITY) -> StackGraphs | None:
    """Run `model`'s decoder blocks through `StackGraphs` while it trains; None where the model has no stack
    of blocks in an `nn.ModuleList` or they train nothing. A no-op off CUDA (every call runs eagerly)."""
    layers = next(_block_stacks(model), None)
    if layers is None:
        return None
    if "_qlora_graphs" in layers.__dict__:
        return layers.__dict__["_qlora_graphs"]
    graphs = StackGraphs(list(layers), max_length=max_length, limit=limit, granularity=granularity)
    if not graphs.params:
        return None
    layers.__dict__["_qlora_graphs"] = graphs
    layers.__dict__["_qlora_class"] = type(layers)
    layers.__class__ = type("GraphedModuleList", (_GraphedLayers, type(layers)), {})
    return graphs


def uninstall(model: Any) -> int:
    """Undo `install`: the blocks run in the stack's own loop again; returns the stacks restored."""
    restored = 0
    for layers in _block_stacks(model):
        if layers.__dict__.pop("_qlora_graphs", None) is not None:
            layers.__class__ = layers.__dict__.pop("_qlora_class")
            restored += 1
    return restored


def installed(model: Any) -> StackGraphs | None:
    """The `StackGraphs` that `install` put on the model, if any."""
    return next((s.__dict__["_qlora_graphs"] for s in _block_stacks(model) if "_qlora_graphs" in s.__dict__), None)
