"""Where the time of one training step of the defaults goes, on a CUDA GPU: host (issuing kernels) or GPU.

    python bench/step_anatomy.py --out .bench-out

One process, the defaults' model (EXAONE-3.5-2.4B saved as the hub has it, random weights, in NF4 with the dequantized weight cache, varlen
attention, the fused kernels of speed.apply_kernels, LoRA r16 on q/k/v/o with dropout 0.1, the lean forward, q/k/v
in one matmul, bitsandbytes' optimizer without its per-parameter syncs)
and the defaults' step: 16 QA pairs of the benchmark's data packed into one row (its boundaries from the
trainer's collator), forward, backward, gradient clipping, optimizer.

  eager          a hand-written loop (no Trainer): only the model and the optimizer
  eager-peft     the same with peft's own LoRA forward instead of speed.use_lean_lora's
  eager-liger-norm  the same with Liger's RMSNorm kernel instead of PyTorch's fused one
  eager-unfused  the same with q, k and v as three matmuls (no speed.fuse_projections)
  eager-native-swiglu  the same with transformers' MLP (silu, multiply) instead of Liger's SwiGLU kernel
  eager-fused-mlp  native MLP with gate and up in one matmul too (speed.fuse_projections on them)
  eager-native-rope  the same with transformers' rotary embedding instead of Liger's kernel
  eager-varlen-op  the same with attention through torch's varlen_attn (a Python custom operator) instead of
                 speed._flash_varlen (the same Flash kernel through its aten operator)
  eager-bnb-sync  the same with bitsandbytes' optimizer synchronising the device after every parameter, as it
                 does unless speed.drop_optimizer_syncs
  phases         the eager step's host issue time and wall time, phase by phase (forward, backward, optimizer)
  cprofile       the eager loop's Python functions by their own time, a few steps
  eager-aot      the blocks compiled with torch.compile's aot_eager backend (traced, no generated kernels):
                 how long the tracing takes and what it saves
  eager-per-parameter-optimizer  the same with bitsandbytes' optimizer updating one tensor at a time (no
                 speed.bucket_optimizer_parameters)
  eager+adamw    the same with fused AdamW instead of paged AdamW 8-bit (what the optimizer costs)
  eager-graphs   the same with the decoder blocks replayed from CUDA graphs (graphs.install, as speed.configure
                 does; captured the first time each padded size comes, kept across rounds)
  trainer-asis   the product's QLoRATrainer as it was: the Trainer's per-step NaN filter (a host sync every
                 micro-batch), parameter count, clipping over every parameter and training-mode walk
  trainer-blocking  QLoRATrainer with batches copied to the GPU from pageable memory, waiting for each copy
                 (so for the GPU to finish the last step), as before
  trainer-walk-zero-grad  QLoRATrainer with the Trainer's model.zero_grad() walking every module, as before
  trainer-per-parameter-optimizer  QLoRATrainer with bitsandbytes' optimizer one tensor at a time, as before
  trainer        QLoRATrainer as training.py runs it, logging every step (as the product does in a run of up
                 to 100 steps; a longer one logs a hundred times)
  trainer-log10  the same, logging every 10th step
  trainer-graphs QLoRATrainer with the decoder blocks from CUDA graphs (as the product runs it: the variants
                 above run them eagerly)

For each: ms per step (the eager loop with one synchronisation per step and without, so host and GPU overlap
across steps; the eager variants run `--rounds` times in turn and report their best round (or with `--interleave`
step by step in turn, each step timed alone, and report the median step), as a lent machine's
host drifts by tens of per cent over a few minutes), useful tokens/s, MFU; the eager loop's profiler CPU and
CUDA totals of one step with the operators that take the most host and GPU time (the CUDA total counts a kernel
under its operator and under its own name, so it is about twice the GPU's time); cProfile of a few Trainer steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))
sys.path.insert(0, str(REPO / "bench"))

from qlora_trainer import graphs, speed  # noqa: E402
from qlora_trainer.data import collator as data_collator  # noqa: E402
from trainer_speed import (  # noqa: E402
    SIZES,
    TARGETS,
    TINY_SHAPE,
    build_model_dir,
    load_4bit,
    lora_config,
    make_dataset,
)

MAX_LENGTH = 1024
TOKEN_BUDGET = 16384  # the defaults' plan on an H100/H200: 16 examples of up to 1024 tokens in one micro-batch
VARIANTS = (
    "eager,eager-unfused,eager-per-parameter-optimizer,eager-native-swiglu,eager-fused-mlp,eager-native-rope,"
    "eager-varlen-op,eager-bnb-sync,phases,cprofile,eager-peft,eager-liger-norm,eager+adamw,trainer-asis,"
    "trainer-blocking,trainer-walk-zero-grad,trainer-per-parameter-optimizer,trainer,trainer-log10,eager-aot,"
    "eager-graphs,trainer-graphs"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".bench-out")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--rounds", type=int, default=3, help="times each eager variant runs, in turn")
    parser.add_argument(
        "--interleave", action="store_true",
        help="eager variants one step each in a rotating order (A B C, B C A, ...), each step timed alone",
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of the eager variants, tiny model")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or args.out / "model-exaone-3.5-2.4b"
    speed.allocator_env()

    import torch
    import bitsandbytes as bnb
    from peft import get_peft_model

    device = "cpu" if args.tiny else "cuda:0"
    model_shape = TINY_SHAPE if args.tiny else SIZES["2.4b"]
    if args.tiny:
        args.model_dir = args.out / "model-tiny"
    build_model_dir(args.model_dir, model_shape, device)
    shape = speed.ModelShape.from_config(argparse.Namespace(**model_shape))
    train, _ = make_dataset(2000, 128 if args.tiny else MAX_LENGTH, shape.vocab_size)
    attention = speed.choose_attention(device)
    model = load_4bit(args.model_dir, attention, device)
    from transformers.models.llama import modeling_llama

    native_rope = modeling_llama.apply_rotary_pos_emb  # before Liger swaps in its own
    kernels = speed.apply_kernels(model)
    speed.cache_dequantized_weights(model)
    speed.prepare_for_kbit_training_lean(model, 0)
    model = get_peft_model(model, lora_config())
    model.train()  # as the Trainer leaves it (from_pretrained gives eval mode: no LoRA dropout at all)
    model.config.use_cache = False  # as the Trainer runs it (a KV cache would be filled in every training forward)
    cuda = device.startswith("cuda")
    lean = speed.use_lean_lora(model) if cuda else 0
    fused = speed.fuse_projections(model) if cuda else 0  # as speed.configure does with the weight cache
    speed.drop_optimizer_syncs()
    if cuda:  # as speed.configure does, off but in the graph variants
        stack = graphs.install(model, max_length=MAX_LENGTH, limit=TOKEN_BUDGET)
        if stack is None:
            raise SystemExit("no decoder stack for CUDA graphs in this model")
        stack.enabled = False
    params = [p for p in model.parameters() if p.requires_grad]
    collate = data_collator(None, packing=True, boundaries=attention == speed.VARLEN)
    steps = []
    for i in range(args.steps + 3):
        feats = train[i * 16 : (i + 1) * 16]
        batch = collate(feats)
        on_device = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        steps.append((on_device, [len(f["input_ids"]) for f in feats]))
    fpt = speed.flops_per_token(shape, shape.lora_params(16, TARGETS), [n for _, lens in steps[3:] for n in lens])
    useful = sum(sum(lens) for _, lens in steps[3:])
    print(
        json.dumps(
            {
                "attention": attention,
                "varlen": getattr((speed.attention._VARLEN_CALL or [None])[0], "__name__", None),
                "kernels": kernels,
                "fused": fused,
                "lean_lora_layers": lean,
                "tokens_per_step": useful / args.steps,
            }
        ),
        flush=True,
    )
    rows = []

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loss_kwargs = {"skip_logits": True} if "fused_linear_cross_entropy" in kernels else {}

    def make_opt(kind):
        if kind == "adamw" or not cuda:
            return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01, fused=True)
        return bnb.optim.PagedAdamW8bit(params, lr=5e-5, weight_decay=0.01)

    def eager_step(opt, batch):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(**batch, **loss_kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def time_loop(step, sync_each: bool) -> float:
        for batch, _ in steps[:3]:
            step(batch)
        sync()
        t = time.perf_counter()
        for batch, _ in steps[3:]:
            step(batch)
            if sync_each:
                sync()
        sync()
        return (time.perf_counter() - t) / args.steps

    def profile(step) -> dict:
        batch = steps[3][0]
        sync()
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            step(batch)
            sync()
        ka = prof.key_averages()
        cpu_ms = sum(e.self_cpu_time_total for e in ka) / 1e3
        gpu_ms = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e3
        top = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:14]
        top_gpu = sorted(ka, key=lambda e: -getattr(e, "self_device_time_total", 0))[:14]
        return {
            "profile_cpu_ms": cpu_ms,
            "profile_cuda_ms": gpu_ms,
            "profile_events": sum(e.count for e in ka),
            "top_cpu": [(e.key[:60], round(e.self_cpu_time_total / 1e3, 1), e.count) for e in top],
            "top_gpu": [
                (e.key[:60], round(getattr(e, "self_device_time_total", 0) / 1e3, 1), e.count) for e in top_gpu
            ],
        }

    def record(step) -> tuple[float, float]:
        """ms per step of the loop with a synchronisation after each step, and without."""
        return time_loop(step, True) * 1e3, time_loop(step, False) * 1e3

    def row_of(label, timings: list[tuple[float, float]], **extra) -> dict:
        """The best of the rounds (the least disturbed by the host), with the spread between rounds."""
        best = [min(t[i] for t in timings) for i in (0, 1)]
        row = {"variant": label, "ms_sync_each": best[0], "ms_overlapped": best[1], **extra}
        row["ms_overlapped_rounds"] = [round(t[1], 1) for t in timings]
        row["tok_s"] = useful / args.steps / (min(best) / 1e3)
        row["mfu"] = speed.mfu(row["tok_s"], fpt)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / speed.GIB if cuda else 0.0
        return row

    variants = args.variants.split(",")
    opt = make_opt("paged")
    buckets = speed.bucket_optimizer_parameters(opt)  # as QLoRATrainer.create_optimizer does
    print(json.dumps({"optimizer_buckets": len(buckets), "bucketed": sum(len(b.members) for b in buckets)}), flush=True)
    other_steps = {}
    if "eager+adamw" in variants:
        fast_opt = make_opt("adamw")
        other_steps["eager+adamw"] = lambda b: eager_step(fast_opt, b)
    if "eager-per-parameter-optimizer" in variants:
        plain_opt = make_opt("paged")  # over the same parameters (views into the buckets), one at a time
        other_steps["eager-per-parameter-optimizer"] = lambda b: eager_step(plain_opt, b)
    eager_labels = [v for v in variants if v in EAGER_TOGGLES and (cuda or v in ("eager", "eager+adamw"))]
    toggle = lambda label: eager_toggle(label, model, native_rope)  # noqa: E731
    if args.interleave:
        measure_interleaved(eager_labels, toggle, lambda b: eager_step(opt, b), other_steps, steps, sync, row_of, rows)
    else:
        measure_eager(
            eager_labels, args.rounds, toggle, record, row_of, lambda b: eager_step(opt, b), other_steps, rows
        )
    if "eager" in variants:  # after the timings: the profiler may leave the process slower than it found it
        rows.append({"variant": "eager-profile", **profile(lambda b: eager_step(opt, b))})
    if "phases" in variants:
        rows.append(phases(model, opt, steps, loss_kwargs, device, sync, torch))
        print(json.dumps(rows[-1]), flush=True)
    if "cprofile" in variants:
        rows.append(python_profile(lambda b: eager_step(opt, b), steps, sync))
        print(rows[-1]["cprofile"], flush=True)
    trainer_labels = [v for v in TRAINER_VARIANTS if v in variants]
    measure_trainer(trainer_labels, args.rounds, lambda label, profile: trainer_run(
        label, model, train, collate, args, torch, fpt, profile_python=profile), rows)
    if "eager-aot" in variants and cuda:
        speed.unfuse_projections(model)  # dynamo traces the plain per-layer forward
        layers = speed.decoder_layers(model)
        for layer in layers:
            layer.compile(backend="aot_eager", dynamic=True)
        t = time.perf_counter()
        eager_step(opt, steps[0][0])
        sync()
        first = time.perf_counter() - t
        rows.append(row_of("eager-aot", [record(lambda b: eager_step(opt, b))], first_step_s=first))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "step_anatomy.json").write_text(json.dumps(rows, indent=1))
    print("\n| variant | ms/step (sync each) | ms/step (overlapped) | useful tok/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "ms_sync_each" not in r and "error" not in r:
            continue
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:80]} | | | | |")
            continue
        print(
            f"| {r['variant']} | {r['ms_sync_each']:.0f} | {r['ms_overlapped']:.0f} | {r['tok_s']:,.0f} | "
            f"{r['mfu'] * 100:.1f}% | {r['peak_gib']:.1f} |"
        )
    for r in rows:
        if "top_cpu" in r:
            print(
                f"\n{r['variant']}: profiled step CPU {r['profile_cpu_ms']:.0f} ms, "
                f"CUDA {r['profile_cuda_ms']:.0f} ms, {r['profile_events']} events"
            )
            for kind in ("top_cpu", "top_gpu"):
                print(f" {kind}:")
                for name, ms, count in r[kind]:
                    print(f"  {ms:8.1f} ms  {count:6d}  {name}")
    return 0


TRAINER_VARIANTS = (
    "trainer-asis", "trainer-blocking", "trainer-walk-zero-grad", "trainer-per-parameter-optimizer", "trainer",
    "trainer-log10", "trainer-graphs",
)
EAGER_TOGGLES = (
    "eager", "eager-unfused", "eager-per-parameter-optimizer", "eager-native-swiglu", "eager-fused-mlp",
    "eager-native-rope", "eager-varlen-op", "eager-bnb-sync", "eager-peft", "eager-liger-norm", "eager+adamw",
    "eager-graphs",
)


def measure_interleaved(labels, toggle, step, other_steps, steps, sync, row_of, rows) -> None:
    """The eager variants one step each in turn, in a rotating order, every step timed alone between
    synchronisations (so a drifting host drifts under all of them alike, step by step); one row each, the median
    step."""
    import statistics

    times: dict[str, list[float]] = {label: [] for label in labels}
    for i, (batch, _) in enumerate(steps):
        turn = i % len(labels)
        for label in labels[turn:] + labels[:turn]:  # each variant first in turn: no place in the order favoured
            with toggle(label):
                run = other_steps.get(label, step)
                sync()
                t = time.perf_counter()
                run(batch)
                sync()
                if i >= 3:  # after the warm-up steps
                    times[label].append((time.perf_counter() - t) * 1e3)
    for label in labels:
        median = statistics.median(times[label])
        row = row_of(label, [(median, median)])
        row["ms_steps"] = [round(t, 1) for t in times[label]]
        rows.append(row)
        print(json.dumps(row), flush=True)


def measure_eager(labels, rounds, toggle, record, row_of, step, other_steps, rows) -> None:
    """Each eager variant's loop, `rounds` times in turn (A B C A B C ...), so that a host that drifts over the
    minutes of the run drifts under all of them alike; one row each, the best round with all of them."""
    timings: dict[str, list] = {label: [] for label in labels}
    extra: dict[str, dict] = {label: {} for label in labels}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for label in labels:
            if label in failed:
                continue
            try:
                with toggle(label) as info:
                    extra[label].update(info)
                    timings[label].append(record(other_steps.get(label, step)))
            except Exception as exc:  # noqa: BLE001 - report and go on to the next variant
                import traceback

                traceback.print_exc()
                failed[label] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for label in labels:
        row = {"variant": label, "error": failed[label]} if label in failed else row_of(
            label, timings[label], **extra[label]
        )
        rows.append(row)
        print(json.dumps(row), flush=True)


def eager_toggle(label, model, native_rope):
    """A context that puts the model in the variant's state for the loop and back afterwards (yields notes)."""
    import contextlib

    from transformers.models.llama import modeling_llama

    from qlora_trainer import speed

    @contextlib.contextmanager
    def unfused():
        speed.unfuse_projections(model)
        try:
            yield {}
        finally:
            speed.fuse_projections(model)

    @contextlib.contextmanager
    def native_swiglu(fuse_mlp: bool):
        mlps = [m for m in model.modules() if "forward" in m.__dict__ and hasattr(m, "gate_proj")]
        liger = [m.__dict__.pop("forward") for m in mlps]
        groups = speed.fuse_projections(model, ("gate_proj", "up_proj")) if fuse_mlp else 0
        try:
            yield {"mlps": len(mlps), "mlp_groups": groups}
        finally:
            if fuse_mlp:
                speed.unfuse_projections(model)
                speed.fuse_projections(model)
            for m, forward in zip(mlps, liger):
                m.forward = forward

    @contextlib.contextmanager
    def swapped(owner, name, value):
        kept = getattr(owner, name)
        setattr(owner, name, value)
        try:
            yield {}
        finally:
            setattr(owner, name, kept)

    @contextlib.contextmanager
    def public_varlen():
        kept = speed._varlen_call()
        speed.attention._VARLEN_CALL = speed._public_varlen_call()
        try:
            yield {"varlen": getattr(speed.attention._VARLEN_CALL[0], "__name__", "?")}
        finally:
            speed.attention._VARLEN_CALL = kept

    @contextlib.contextmanager
    def bnb_sync():
        import bitsandbytes.optim.optimizer as bnb_optimizer

        with swapped(bnb_optimizer, "sync_gpu", bnb_optimizer.sync_gpu._qlora_original) as info:
            yield info

    @contextlib.contextmanager
    def peft_forward():
        restored = [m for m in model.modules() if hasattr(m, "lora_A") and m.__dict__.pop("forward", None) is not None]
        speed.unfuse_projections(model)
        try:
            yield {"restored_layers": len(restored)}
        finally:
            speed.use_lean_lora(model)
            speed.fuse_projections(model)

    @contextlib.contextmanager
    def liger_norm():
        swap_norms(model, liger=True)
        try:
            yield {}
        finally:
            swap_norms(model, liger=False)

    return {
        "eager-unfused": unfused,
        "eager-native-swiglu": lambda: native_swiglu(False),
        "eager-fused-mlp": lambda: native_swiglu(True),
        "eager-native-rope": lambda: swapped(modeling_llama, "apply_rotary_pos_emb", native_rope),
        "eager-varlen-op": public_varlen,
        "eager-bnb-sync": bnb_sync,
        "eager-peft": peft_forward,
        "eager-liger-norm": liger_norm,
        "eager-graphs": lambda: graphs_on(model),
    }.get(label, lambda: contextlib.nullcontext({}))()


@contextlib.contextmanager
def graphs_on(model):
    """The decoder blocks from CUDA graphs (captures kept across rounds); yields notes that end with the stats."""
    stack = graphs.installed(model)
    stack.enabled = True
    stack.stats = graphs.GraphStats()  # this variant's own (the stack is shared, the captures kept)
    notes: dict = {}
    try:
        yield notes
    finally:
        stack.enabled = False
        notes["graphs"] = stack.stats.describe()


def phases(model, opt, steps, loss_kwargs, device, sync, torch) -> dict:
    """The eager step phase by phase, each ending in a synchronisation: how long the host takes to issue the
    phase (until the call returns) and how long until the GPU has run it, ms, median over the steps."""
    import statistics

    params = [p for p in model.parameters() if p.requires_grad]
    marks: dict[str, list[float]] = {}

    def mark(name, t0, t_issued):
        sync()
        t_done = time.perf_counter()
        marks.setdefault(name + "_issue_ms", []).append((t_issued - t0) * 1e3)
        marks.setdefault(name + "_done_ms", []).append((t_done - t0) * 1e3)
        return t_done

    for batch, _ in steps[1:]:
        sync()
        t = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(**batch, **loss_kwargs).loss
        t = mark("forward", t, time.perf_counter())
        loss.backward()
        t = mark("backward", t, time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer", t, time.perf_counter())
    return {"variant": "phases", **{k: round(statistics.median(v), 1) for k, v in marks.items()}}


def python_profile(step, steps, sync) -> dict:
    """cProfile of a few eager steps: the Python functions by their own time."""
    for batch, _ in steps[:2]:
        step(batch)
    sync()

    def three_steps():
        for batch, _ in steps[3:6]:
            step(batch)
        sync()

    return {"variant": "cprofile", "cprofile": cprofile_text(three_steps, own=35)}


def cprofile_text(run, own: int, cumulative: int = 0, callers: str | None = None) -> str:
    """`run()` under cProfile: its `own` functions of most own time, `cumulative` of most time with their
    callees, and the callers of the functions matching `callers`."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(own)
    if cumulative:
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(cumulative)
    if callers:
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_callers(callers)
    return text.getvalue()


def swap_norms(model, liger: bool) -> None:
    """Run the norms that speed.use_native_rms_norm switched through Liger's RMSNorm kernel instead (and back)."""
    import types

    from liger_kernel.ops import LigerRMSNormFunction

    def liger_forward(self, hidden_states):
        return LigerRMSNormFunction.apply(hidden_states, self.weight, self._qlora_eps, 0.0, "llama", True, None)

    for module in model.modules():
        if hasattr(module, "_qlora_eps"):
            if liger:
                module._qlora_native = module.forward
                module.forward = types.MethodType(liger_forward, module)
            else:
                module.forward = module._qlora_native


def measure_trainer(labels, rounds, run, rows) -> None:
    """Each Trainer variant `rounds` times in turn, as measure_eager does; one row each, its best round, with
    the rounds' figures; then a few steps of `trainer` under cProfile."""
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for _ in range(rounds):
        for label in labels:
            if not any("error" in r for r in runs[label]):
                runs[label].append(run(label, False))
    for label in labels:
        failed = [r for r in runs[label] if "error" in r]
        row = failed[0] if failed else dict(min(runs[label], key=lambda r: r["ms_overlapped"]))
        if not failed:
            row["ms_overlapped_rounds"] = [round(r["ms_overlapped"], 1) for r in runs[label]]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if "trainer" in labels:
        profiled = run("trainer", True)
        if "cprofile" in profiled:
            print(profiled["cprofile"], flush=True)


def trainer_run(label, model, train, collate, args, torch, fpt: float, profile_python: bool) -> dict:
    """The model trained by the product's QLoRATrainer for a few steps: ms per step from the step ends.

    trainer-asis: the Trainer's NaN filter (a sync each micro-batch) and its per-step parameter count, as
    before; trainer-blocking: batches copied to the GPU with a wait, from pageable memory, as before;
    trainer-walk-zero-grad, trainer-per-parameter-optimizer: the Trainer's zero_grad and optimizer, as before;
    trainer: what training.py sets now; trainer-log10: the same, logging every 10th step instead of every step
    (each logged step reads the loss and gradient norm back). With `profile_python`, a few steps under cProfile
    instead."""
    import contextlib
    import types

    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from trainer_speed import ListDataset

    from qlora_trainer.training import QLoRATrainer

    import gc
    import statistics

    marks: list[float] = []
    parts: dict[str, list[float]] = {}
    last: dict[str, float] = {}

    def lap(name):
        now = time.perf_counter()
        if "at" in last:
            parts.setdefault(name, []).append((now - last["at"]) * 1e3)
        last["at"] = now

    class Clock(TrainerCallback):
        """Host time between the Trainer's step events: what the host spends on each part of a step."""

        def on_step_begin(self, targs, state, control, **kw):
            lap("data_and_logging")

        def on_pre_optimizer_step(self, targs, state, control, **kw):
            lap("forward_backward_clip")

        def on_optimizer_step(self, targs, state, control, **kw):
            lap("optimizer")

        def on_step_end(self, targs, state, control, **kw):
            lap("scheduler_zero_grad")
            marks.append(time.perf_counter())

    gc_ms: list[float] = []

    def gc_clock(phase, info):
        if phase == "start":
            last["gc"] = time.perf_counter()
        elif "gc" in last and len(marks) >= 3:  # collections during the timed steps only
            gc_ms.append((time.perf_counter() - last.pop("gc")) * 1e3)

    # As training.training_arguments sets them on a GPU (trainer-asis and trainer-blocking: as it did before).
    copies_overlap = torch.cuda.is_available() and label not in ("trainer-asis", "trainer-blocking")

    def build(steps):
        targs = TrainingArguments(
            output_dir=str(args.out / f"tmp-{label}"),
            per_device_train_batch_size=16,
            max_steps=steps,
            learning_rate=5e-5,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            optim="paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch",
            max_grad_norm=0.3,
            weight_decay=0.01,
            bf16=True,
            logging_steps=10 if label == "trainer-log10" else 1,
            logging_nan_inf_filter=label == "trainer-asis",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            seed=42,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=copies_overlap,
            accelerator_config={"non_blocking": copies_overlap},
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = QLoRATrainer(
            model=model, args=targs, train_dataset=ListDataset(train), data_collator=collate, callbacks=[Clock()],
            token_budget=TOKEN_BUDGET,
        )
        trainer.remove_callback(PrinterCallback)  # as the product's trainer does
        if label == "trainer-asis":  # the Trainer's own per-step walks over the model, as before
            trainer.floating_point_ops = types.MethodType(Trainer.floating_point_ops, trainer)
            trainer._clip_grad_norm = types.MethodType(Trainer._clip_grad_norm, trainer)
            trainer._train_mode_kept = lambda model: contextlib.nullcontext()
        if label in ("trainer-asis", "trainer-walk-zero-grad"):  # model.zero_grad() over every module, as before
            trainer.train = types.MethodType(Trainer.train, trainer)
        if label in ("trainer-asis", "trainer-per-parameter-optimizer"):  # bitsandbytes one tensor at a time
            trainer.create_optimizer = types.MethodType(Trainer.create_optimizer, trainer)
        return trainer

    row = {"variant": label}
    stack = graphs.installed(model)
    if stack is not None:
        stack.enabled = label == "trainer-graphs"
        stack.stats = graphs.GraphStats()  # this variant's own
    try:
        warm = 3
        if profile_python:
            # Who walks the model's modules in a step, too (each walk is host time the GPU may wait for).
            walks = r"\(named_parameters\)|\(parameters\)|\(modules\)|\(named_modules\)"
            return {"variant": label, "cprofile": cprofile_text(build(4).train, own=18, cumulative=40, callers=walks)}
        trainer = build(warm + args.steps)
        gc.callbacks.append(gc_clock)
        trainer.train()
        gc.callbacks.remove(gc_clock)
        per_step = (marks[-1] - marks[warm - 1]) / args.steps
        row["host_ms"] = {k: round(statistics.median(v[warm:] or v), 1) for k, v in parts.items()}
        row["gc_ms_per_step"] = round(sum(gc_ms) / args.steps, 2)
        row["gc_runs"] = len(gc_ms)
        row["ms_sync_each"] = row["ms_overlapped"] = per_step * 1e3
        tokens = sum(len(x["input_ids"]) for x in train) / len(train) * 16
        row["tok_s"] = tokens / per_step
        row["mfu"] = speed.mfu(row["tok_s"], fpt)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / speed.GIB if torch.cuda.is_available() else 0.0
        if stack is not None and stack.enabled:
            row["graphs"] = stack.stats.describe()
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        if stack is not None:
            stack.enabled = False
    return row


if __name__ == "__main__":
    raise SystemExit(main())
