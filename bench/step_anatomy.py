"""Where the time of one training step of the defaults goes, on a CUDA GPU: host (issuing kernels) or GPU.

    python bench/step_anatomy.py --out .bench-out

One process, the defaults' model (EXAONE-3.5-2.4B's shape in NF4 with the dequantized weight cache, varlen
attention, the fused kernels of speed.apply_kernels, LoRA r16 on q/k/v/o with dropout 0.1 and the lean forward)
and the defaults' step: 16 QA pairs of the benchmark's data packed into one row (its boundaries from the
trainer's collator), forward, backward, gradient clipping, optimizer.

  eager          a hand-written loop (no Trainer): only the model and the optimizer
  eager-peft     the same with peft's own LoRA forward instead of speed.use_lean_lora's
  eager-liger-norm  the same with Liger's RMSNorm kernel instead of PyTorch's fused one
  eager+adamw    the same with fused AdamW instead of paged AdamW 8-bit (what the optimizer costs)
  trainer-asis   the product's QLoRATrainer as it was: the Trainer's per-step NaN filter (a host sync every
                 micro-batch), parameter count, clipping over every parameter and training-mode walk
  trainer        QLoRATrainer as training.py runs it, logging every step (as the product does in a run of up
                 to 100 steps; a longer one logs a hundred times)
  trainer-log10  the same, logging every 10th step

For each: ms per step (the eager loop with one synchronisation per step and without, so host and GPU overlap
across steps), useful tokens/s, MFU; the eager loop's profiler CPU and CUDA totals of one step with the
operators that take the most host and GPU time (the CUDA total counts a kernel under its operator and under its
own name, so it is about twice the GPU's time); cProfile of a few Trainer steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))
sys.path.insert(0, str(REPO / "bench"))

from qlora_trainer import speed  # noqa: E402
from qlora_trainer.data import collator as data_collator  # noqa: E402
from trainer_speed import (  # noqa: E402
    EXAONE_SHAPE,
    TARGETS,
    TINY_SHAPE,
    build_model_dir,
    load_4bit,
    lora_config,
    make_dataset,
)

VARIANTS = "eager,eager-peft,eager-liger-norm,eager+adamw,trainer-asis,trainer,trainer-log10"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".bench-out")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of the eager variants, tiny model")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or args.out / "model-exaone-shape"
    speed.allocator_env()

    import torch
    import bitsandbytes as bnb
    from peft import get_peft_model

    device = "cpu" if args.tiny else "cuda:0"
    model_shape = TINY_SHAPE if args.tiny else EXAONE_SHAPE
    if args.tiny:
        args.model_dir = args.out / "model-tiny"
    build_model_dir(args.model_dir, model_shape, device)
    shape = speed.ModelShape.from_config(argparse.Namespace(**model_shape))
    train, _ = make_dataset(2000, 128 if args.tiny else 1024, shape.vocab_size)
    attention = speed.choose_attention(device)
    model = load_4bit(args.model_dir, attention, device)
    kernels = speed.apply_kernels(model)
    speed.cache_dequantized_weights(model)
    speed.prepare_for_kbit_training_lean(model, 0)
    model = get_peft_model(model, lora_config())
    cuda = device.startswith("cuda")
    lean = speed.use_lean_lora(model) if cuda else 0
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
    print(json.dumps({"attention": attention, "kernels": kernels, "tokens_per_step": useful / args.steps}), flush=True)
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

    def record(label, step, prof=False, **extra):
        row = {"variant": label, **extra}
        try:
            row["ms_sync_each"] = time_loop(step, True) * 1e3
            row["ms_overlapped"] = time_loop(step, False) * 1e3
            best = min(row["ms_sync_each"], row["ms_overlapped"]) / 1e3
            row["tok_s"] = useful / args.steps / best
            row["mfu"] = speed.mfu(row["tok_s"], fpt)
            row["peak_gib"] = torch.cuda.max_memory_allocated() / speed.GIB if cuda else 0.0
            if prof:
                row.update(profile(step))
        except Exception as exc:  # noqa: BLE001 - report and go on to the next variant
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    variants = args.variants.split(",")
    opt = make_opt("paged")
    if "eager" in variants:
        record("eager", lambda b: eager_step(opt, b), prof=True)
    if "eager-peft" in variants and lean:
        restored = [m for m in model.modules() if hasattr(m, "lora_A") and m.__dict__.pop("forward", None) is not None]
        record("eager-peft", lambda b: eager_step(opt, b), restored_layers=len(restored))
        speed.use_lean_lora(model)
    if "eager-liger-norm" in variants and cuda:
        swap_norms(model, liger=True)
        record("eager-liger-norm", lambda b: eager_step(opt, b))
        swap_norms(model, liger=False)
    if "eager+adamw" in variants:
        fast_opt = make_opt("adamw")
        record("eager+adamw", lambda b: eager_step(fast_opt, b))
    for label in ("trainer-asis", "trainer", "trainer-log10"):
        if label in variants:
            profile_python = label != "trainer-log10"
            record_trainer(label, model, train, collate, rows, args, torch, fpt, profile_python=profile_python)
    (args.out / "step_anatomy.json").write_text(json.dumps(rows, indent=1))
    print("\n| variant | ms/step (sync each) | ms/step (overlapped) | useful tok/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
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


def record_trainer(label, model, train, collate, rows, args, torch, fpt: float, profile_python: bool) -> None:
    """The model trained by the product's QLoRATrainer for a few steps: ms per step from the step ends.

    trainer-asis: the Trainer's NaN filter (a sync each micro-batch) and its per-step parameter count, as
    before; trainer: what training.py sets now; trainer-log10: the same, logging every 10th step instead of
    every step (each logged step reads the loss and gradient norm back). Then a few steps under cProfile."""
    import contextlib
    import cProfile
    import io
    import pstats
    import types

    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from trainer_speed import ListDataset

    from qlora_trainer.training import QLoRATrainer

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            marks.append(time.perf_counter())

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
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = QLoRATrainer(
            model=model, args=targs, train_dataset=ListDataset(train), data_collator=collate, callbacks=[Clock()],
            token_budget=16384,
        )
        trainer.remove_callback(PrinterCallback)  # as the product's trainer does
        if label == "trainer-asis":  # the Trainer's own per-step walks over the model, as before
            trainer.floating_point_ops = types.MethodType(Trainer.floating_point_ops, trainer)
            trainer._clip_grad_norm = types.MethodType(Trainer._clip_grad_norm, trainer)
            trainer._train_mode_kept = lambda model: contextlib.nullcontext()
        return trainer

    row = {"variant": label}
    try:
        warm = 3
        build(warm + args.steps).train()
        per_step = (marks[-1] - marks[warm - 1]) / args.steps
        row["ms_sync_each"] = row["ms_overlapped"] = per_step * 1e3
        tokens = sum(len(x["input_ids"]) for x in train) / len(train) * 16
        row["tok_s"] = tokens / per_step
        row["mfu"] = speed.mfu(row["tok_s"], fpt)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / speed.GIB if torch.cuda.is_available() else 0.0
        if profile_python:
            trainer = build(4)
            prof = cProfile.Profile()
            prof.enable()
            trainer.train()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
            row["cprofile"] = text.getvalue()
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "cprofile"}), flush=True)
    if "cprofile" in row:
        print(row["cprofile"], flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
