"""Trainer speed on one GPU: the seed guide's QLoRA recipe against the trainer's defaults and low-memory setting.

    python bench/trainer_speed.py --out .bench-out             # the comparison of issue 7 (CUDA machine)
    python bench/trainer_speed.py --sweep --out .bench-out     # one-process sweep of techniques (CUDA machine)
    python bench/trainer_speed.py --tiny --out /tmp/b          # CPU smoke run of every code path, tiny model
    python bench/trainer_speed.py --cli-packages trainer        # the real CLI (`python -m qlora_trainer`), one epoch
    python bench/trainer_speed.py --size 7.8b --settings defaults,defaults48 --out .bench-out   # another size

One run compares, on the same data, seed and GPU, each setting in its own process (so peak memory and the
global kernel patches of one cannot leak into the next):

  guide      the seed guide's recipe exactly: every example padded to 1024, micro-batch 2 x accumulation 8,
             gradient checkpointing, eager attention, peft's prepare_model_for_kbit_training (fp32 norms and
             embeddings), attention-only LoRA r16/a32/dropout 0.1/rsLoRA, paged AdamW 8-bit, lr 5e-5 cosine,
             max grad norm 0.3, NF4 + double quantization, bf16 compute; the transformers Trainer.
  defaults   the trainer's defaults on the GPU fast path (what speed.configure does): packing without padding,
             varlen Flash attention with the boundaries from the collator, Liger's SwiGLU/RoPE/fused loss,
             PyTorch's fused RMSNorm, the lean LoRA forward, no fp32 copies, and speed.plan_batch sizing the packed
             micro-batch, checkpointing and the dequantized weight cache from free GPU memory; the optimizer
             batch (16 examples), optimizer, schedule and LoRA are the guide's. The product loop: the
             trainer's QLoRATrainer cuts each step's packed row under the plan's token budget.
  defaults24 the same, with the process capped at 24 GiB (a 3090/4090-class card); `defaultsN` caps at N GiB.
  lowmem     the same, capped at 5 GiB: the planner then checkpoints (nearly) every block.
  defaults-eager (optional) defaults with the decoder blocks run eagerly (no CUDA graphs).
  compiled   (optional) defaults plus torch.compile of the decoder blocks (Liger's fused loss only).
  defaults-nocache (optional) defaults without the dequantized weight cache.
  explicit2  (optional) packed micro-batches of 2 x 1024 tokens with checkpointing on every block (the trainer's
             budget before speed.configure), varlen and Liger.

The model is random-weight, saved once in bf16 exactly as the hub's EXAONE-3.5 checkpoint of `--size` is
(`model_type: exaone`, EXAONE's weight names and config fields, tied embeddings at 2.4B; shard by shard,
qlora_trainer.testing.save_exaone_checkpoint), and loaded through the real path: from_pretrained with a
BitsAndBytesConfig, which transformers runs with its Llama code. (Runs before 2026-12-04 used a Llama-typed copy
of the 2.4B shape.) The data: 2,000 QA pairs,
rendered lengths log-normal (median 300, sigma 0.6, capped 1024, seed 0), answers a fixed function of the
question (each answer token is a fixed permutation of the question token it copies), 5% held out.

Printed for each: useful (non-padding) tokens/s over a steady window, one epoch's wall time (measured when the
epoch ran, else extrapolated and marked `~`), peak GPU memory, MFU, eval loss after the epoch (or after the steps
run, marked as such), and ratios against the guide.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

from qlora_trainer import speed  # noqa: E402  (torch-free at import)
from qlora_trainer.data import collator as data_collator  # noqa: E402
from qlora_trainer.testing import EXAONE_35_SHAPES, exaone_config, save_exaone_checkpoint  # noqa: E402

# EXAONE-3.5's published shapes by --size, in EXAONE's own config field names; a tiny one for CPU smoke runs.
SIZES = EXAONE_35_SHAPES
TINY_SHAPE = dict(
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=2048,
    tie_word_embeddings=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PAD, BOS, EOS, USER, ASSISTANT = 0, 1, 2, 3, 4
SYSTEM = [5, 6, 7, 8, 9, 10, 11, 12]
SETTINGS = ["guide", "defaults", "defaults24", "lowmem"]
LOWMEM_GIB = 5.0


# ----------------------------------------------------------------------------------------------------------------
# Data


def make_dataset(n: int, max_length: int, vocab_size: int, seed: int = 0, median: float = 300.0, sigma: float = 0.6):
    """QA pairs as token ids: [BOS, system, USER, question, ASSISTANT, answer, EOS]; loss on answer and EOS.

    Answer token j is perm[question[j mod len(question)]]: a deterministic function of the question that a
    model can learn by copying through attention.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    overhead = 1 + len(SYSTEM) + 1 + 1 + 1  # BOS, system, USER, ASSISTANT, EOS
    lengths = np.minimum(np.rint(np.exp(np.log(median) + sigma * rng.standard_normal(n))), max_length).astype(int)
    lengths = np.maximum(lengths, overhead + 4)
    lo = 16
    span = max(16, min(4096, (vocab_size - lo) // 2))
    perm = rng.permutation(span) + lo + span
    examples = []
    for length in lengths:
        body = int(length) - overhead
        q_len = body // 2
        a_len = body - q_len
        question = rng.integers(lo, lo + span, q_len)
        answer = perm[question[np.arange(a_len) % q_len] - lo]
        prompt = [BOS, *SYSTEM, USER, *question.tolist(), ASSISTANT]
        ids = prompt + answer.tolist() + [EOS]
        labels = [-100] * len(prompt) + answer.tolist() + [EOS]
        examples.append({"input_ids": ids, "labels": labels})
    order = rng.permutation(n)
    n_eval = max(1, int(round(n * 0.05)))
    evals = [examples[i] for i in order[:n_eval]]
    train = [examples[i] for i in order[n_eval:]]
    return train, evals


class ListDataset:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def pad_collator(max_length: int):
    """The guide's collation: every example padded to max_length."""
    import torch

    def collate(features):
        ids = torch.full((len(features), max_length), PAD, dtype=torch.long)
        labels = torch.full((len(features), max_length), -100, dtype=torch.long)
        mask = torch.zeros((len(features), max_length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


class CountingCollator:
    """Wraps a collator and counts the useful (non-padding) tokens it hands out."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens = 0

    def __call__(self, features):
        self.tokens += sum(len(f["input_ids"]) for f in features)
        return self.inner(features)


# ----------------------------------------------------------------------------------------------------------------
# Model


def model_shape(args) -> dict:
    """The config fields of the model this run uses (EXAONE's names)."""
    return TINY_SHAPE if args.tiny else SIZES[args.size]


def build_model_dir(path: Path, shape: dict, device: str) -> None:
    """Random bf16 weights of the given shape, saved once as the hub's EXAONE-3.5 checkpoints are: the 4-bit
    model is then loaded the real way."""
    if (path / "config.json").exists():
        return
    save_exaone_checkpoint(path, exaone_config(shape), device=device)


def load_4bit(path: Path, attention: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        attn_implementation=attention,
        dtype=torch.bfloat16,
        device_map={"": device},
    )


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=TARGETS,
        use_rslora=True,
        init_lora_weights="gaussian",
        bias="none",
        task_type="CAUSAL_LM",
    )


# ----------------------------------------------------------------------------------------------------------------
# One setting, in its own process


def run_setting(name: str, args) -> dict[str, Any]:
    import torch

    from qlora_trainer import graphs
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    shape = speed.ModelShape.from_config(argparse.Namespace(**model_shape(args)))
    train, evals = make_dataset(args.examples, args.max_length, shape.vocab_size)
    if args.fraction < 1:
        train = train[: max(16, int(len(train) * args.fraction))]
    lengths = [len(x["input_ids"]) for x in train]
    result: dict[str, Any] = {"setting": name, "train_examples": len(train), "useful_tokens_epoch": sum(lengths)}

    capped = re.fullmatch(r"defaults(\d+)", name)
    if capped and cuda:
        speed.cap_gpu_memory(float(capped.group(1)))
    if name == "lowmem" and cuda:
        speed.cap_gpu_memory(args.lowmem_cap)

    t_load = time.perf_counter()
    if name == "guide":
        attention = "eager"
        model = load_4bit(args.model_dir, attention, device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        kernels: list[str] = []
        micro, accum, ckpt_trainer = 2, 8, True
        token_budget = None
        collator = pad_collator(args.max_length)
        plan_text = "guide: micro-batch 2 x 8, padded to max length, checkpointing every block"
    else:
        attention = speed.choose_attention(device)
        model = load_4bit(args.model_dir, attention, device)
        kernels = speed.apply_kernels(model, layer_kernels=not name.startswith("compiled"))
        if name == "explicit2":
            plan = speed.BatchPlan(
                micro_batch=16, accumulation_steps=1, token_budget=2 * args.max_length, packed=True,
                checkpointed_layers=shape.num_layers, num_layers=shape.num_layers,
                worst_case_tokens=2 * args.max_length, dense_weights=False, estimated_peak_bytes=0, budget_bytes=0,
                reason="explicit batchSize 2, gradientCheckpointing true",
            )
        else:
            if cuda:
                torch.cuda.synchronize()
                free, _total = speed.free_gpu_bytes()
                budget = free + torch.cuda.memory_allocated()
                held = torch.cuda.memory_allocated()
            else:
                budget, held = 64 * speed.GIB, speed.model_bytes(model)
            plan = speed.plan_batch(
                optimizer_batch=16,
                max_length=args.max_length,
                mean_length=sum(lengths) / len(lengths),
                budget_bytes=budget,
                model_bytes=held,
                shape=shape,
                fused_loss="fused_linear_cross_entropy" in kernels,
                dense_weight_bytes=0 if "nocache" in name else speed.dense_weight_bytes(model),
                packed=True,
            )
        result["plan"] = plan.to_dict()
        plan_text = plan.describe()
        if plan.dense_weights:
            result["dense_weight_gib"] = speed.cache_dequantized_weights(model) / speed.GIB
        speed.prepare_for_kbit_training_lean(model, plan.checkpointed_layers)
        micro, accum, ckpt_trainer = plan.micro_batch, plan.accumulation_steps, False
        token_budget = plan.token_budget
        # The trainer's collator: with varlen attention it hands over the examples' boundaries too.
        collator = data_collator(None, packing=True, boundaries=attention == speed.VARLEN)
        speed.install_packed_boundaries(model)
    model = get_peft_model(model, lora_config())
    if name != "guide" and cuda:
        # As speed.configure does.
        result["lean_lora_layers"] = speed.use_lean_lora(model)
        if plan.dense_weights:
            result["fused_groups"] = speed.fuse_projections(model)
        result["optimizer_syncs_dropped"] = speed.drop_optimizer_syncs()
        graphed = not name.startswith("compiled") and name != "defaults-eager" and attention == speed.VARLEN
        if graphed and speed.cuda_graphs_fit(plan, shape):  # as speed.configure does
            stack = graphs.install(model, max_length=args.max_length, limit=plan.token_budget)
            result["cuda_graphs"] = stack is not None
            if stack is not None:
                plan = speed.with_graphs(plan, shape)
                result["plan"], plan_text = plan.to_dict(), plan.describe()
    if name.startswith("compiled"):
        result["compiled_layers"] = speed.compile_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.update(attention=attention, kernels=kernels, plan_text=plan_text, micro_batch=micro, accumulation=accum)
    print(f"[{name}] attention={attention} kernels={kernels} trainable={trainable} plan: {plan_text}", flush=True)
    if cuda:
        torch.cuda.synchronize()
        result["model_gib"] = torch.cuda.memory_allocated() / speed.GIB
    result["load_s"] = time.perf_counter() - t_load

    counting = CountingCollator(collator)
    steps_epoch = math.ceil(len(train) / (micro * accum))
    max_steps = args.max_steps if (args.max_steps and name not in args.full_epoch) else -1
    marks: list[tuple[Any, int]] = []

    class Clock(TrainerCallback):
        """The end of each step on the GPU's timeline (a CUDA event: no host sync, which would itself cost
        the overlap of one step's issue with the last one's run), with the tokens handed out by then."""

        def on_step_end(self, targs, state, control, **kw):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append((event, counting.tokens))
            else:
                marks.append((time.perf_counter(), counting.tokens))

    optim = "paged_adamw_8bit" if cuda else "adamw_torch"
    targs = TrainingArguments(
        output_dir=str(args.out / f"tmp-{name}"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_train_epochs=1,
        max_steps=max_steps,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a fraction of the steps (transformers 5 folded warmup_ratio into it)
        optim=optim,
        max_grad_norm=0.3,
        weight_decay=0.01,
        bf16=True,
        gradient_checkpointing=ckpt_trainer,
        logging_steps=10,
        logging_nan_inf_filter=name == "guide",  # the trainer turns the filter's per-step host sync off
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=42,
        data_seed=42,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # The product's copies to the GPU do not wait (training.training_arguments); the guide's do.
        accelerator_config={"non_blocking": cuda and token_budget is not None},
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    common = dict(model=model, args=targs, train_dataset=ListDataset(train), data_collator=counting, callbacks=[Clock()])
    if token_budget is not None:
        # The product's loop: one packed row per optimizer step, cut into micro-batches under the budget.
        from qlora_trainer.training import QLoRATrainer

        trainer = QLoRATrainer(token_budget=token_budget, **common)
    else:
        trainer = Trainer(**common)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps_run = out.global_step
    result.update(steps_run=steps_run, steps_epoch=steps_epoch, train_wall_s=wall, train_loss=out.training_loss)
    stack = graphs.installed(model)
    if stack is not None:
        result["graphs"] = stack.stats.describe()
    if cuda:
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / speed.GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / speed.GIB
    if cuda and token_budget is not None and args.worst_case:
        try:
            result["worst_case_peak_gib"] = worst_case_peak(trainer, model, collator, token_budget, args.max_length, shape)
        except Exception as exc:  # noqa: BLE001 - the epoch's figures stand; the table says what failed
            result["worst_case_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    warm = min(args.warmup_steps + (3 if name.startswith("compiled") else 0), max(0, len(marks) - 2))
    (t_a, n_a), (t_b, n_b) = marks[warm], marks[-1]
    seconds = t_a.elapsed_time(t_b) / 1e3 if cuda else t_b - t_a
    tps = (n_b - n_a) / seconds if seconds > 0 else float("nan")
    result.update(window_steps=len(marks) - 1 - warm, window_tokens=n_b - n_a, tokens_per_s=tps)
    result["epoch_measured"] = steps_run >= steps_epoch
    result["epoch_wall_s"] = wall if result["epoch_measured"] else result["useful_tokens_epoch"] / tps
    fpt = speed.flops_per_token(shape, speed.ModelShape.lora_params(shape, 16, TARGETS), lengths)
    result["flops_per_token"] = fpt
    result["mfu"] = speed.mfu(tps, fpt)
    result["eval_loss"] = eval_loss(model, evals, collator, 2 if name == "guide" else 8, kernels, device)
    result["eval_loss_after"] = "epoch" if result["epoch_measured"] else f"{steps_run} steps"
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
    return result


def worst_case_peak(trainer, model, collator, token_budget: int, max_length: int, shape) -> float:
    """Peak allocated GiB of one training micro-batch at the plan's worst case: `token_budget` tokens in examples
    of max_length (the bench's data rarely packs a step that full, so the epoch's peak is not the plan's).
    The product's step (QLoRATrainer.training_step, graphs and all), after training: the optimizer's states
    are there, as they are at any step but the first."""
    import torch

    generator = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(token_budget // max_length):
        ids = torch.randint(16, shape.vocab_size, (max_length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    batch = {k: (v.to("cuda") if hasattr(v, "to") else v) for k, v in collator(examples).items()}
    labels = torch.tensor(int((batch["labels"] != -100).sum()), device="cuda")
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.training_step(model, batch, labels)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / speed.GIB
    model.zero_grad(set_to_none=True)
    return peak


def eval_loss(model, evals, collator, batch: int, kernels: list[str], device: str) -> float:
    """Token-weighted mean cross-entropy over the answer tokens of the held-out examples."""
    import torch

    model.eval()
    total, count = 0.0, 0
    extra = {"skip_logits": True} if "fused_linear_cross_entropy" in kernels else {}
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        for i in range(0, len(evals), batch):
            b = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in collator(evals[i : i + batch]).items()}
            n = int((b["labels"][..., 1:] != -100).sum())
            loss = model(**b, **extra).loss
            total += float(loss) * n
            count += n
    model.train()
    return total / count


# ----------------------------------------------------------------------------------------------------------------
# Technique sweep (one process, a hand-written step, no Trainer): what each technique pays


def sweep(args) -> list[dict[str, Any]]:
    import torch
    from peft import get_peft_model

    device = "cuda:0"
    shape = speed.ModelShape.from_config(argparse.Namespace(**model_shape(args)))
    train, _ = make_dataset(args.examples, args.max_length, shape.vocab_size)
    speed.register_varlen_attention()
    model = load_4bit(args.model_dir, "sdpa", device)
    speed.prepare_for_kbit_training_lean(model, 0)
    model = get_peft_model(model, lora_config())
    base = model.base_model.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, fused=True)
    rows: list[dict[str, Any]] = []
    cursor = [0]

    def packed(tokens: int):
        feats, n = [], 0
        while True:
            ex = train[cursor[0] % len(train)]
            if n + len(ex["input_ids"]) > tokens and feats:
                break
            feats.append(ex)
            n += len(ex["input_ids"])
            cursor[0] += 1
        b = data_collator(None, packing=True, boundaries=True)(feats)
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in b.items()}, [len(f["input_ids"]) for f in feats]

    def set_ckpt(mode):
        if mode is None:
            base.gradient_checkpointing_disable()
            return
        reentrant, every = mode
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant}, every_n_layers=every)

    def measure(label, attention, tokens, ckpt=None, steps=5, profile=False, extra=None):
        base.config._attn_implementation = attention
        set_ckpt(ckpt)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        extra = extra or {}
        try:
            batches = [packed(tokens) for _ in range(steps + 2)]
            times, useful = [], 0
            prof_table = None
            for i, (b, lens) in enumerate(batches):
                torch.cuda.synchronize()
                t = time.perf_counter()
                ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) if (profile and i == steps + 1) else None
                if ctx:
                    ctx.__enter__()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**b, **extra).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if ctx:
                    ctx.__exit__(None, None, None)
                    prof_table = ctx.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60)
                    continue
                if i >= 2:
                    times.append(time.perf_counter() - t)
                    useful += sum(lens)
            tps = useful / sum(times)
            all_lens = [n for _, lens in batches[2:] for n in lens]
            fpt = speed.flops_per_token(shape, shape.lora_params(16, TARGETS), all_lens)
            row = dict(label=label, tokens=tokens, tok_s=tps, mfu=speed.mfu(tps, fpt), step_s=sum(times) / len(times), peak_gib=torch.cuda.max_memory_allocated() / speed.GIB, reserved_gib=torch.cuda.max_memory_reserved() / speed.GIB, loss=float(loss))
            if prof_table:
                row["profile"] = prof_table
        except torch.OutOfMemoryError:
            row = dict(label=label, tokens=tokens, error="out of memory")
        finally:
            opt.zero_grad(set_to_none=True)
            loss = b = batches = None
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        if "profile" in row:
            print(row["profile"], flush=True)
        return row

    # Correctness first: the same packed batch through SDPA's block-causal mask and through varlen.
    model.eval()
    b, _ = packed(4096)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        losses = {}
        for attention in ("sdpa", speed.VARLEN):
            base.config._attn_implementation = attention
            losses[attention] = float(model(**b).loss)
    model.train()
    print(json.dumps({"check": "same batch, sdpa vs varlen loss", **losses, "gqa_native": speed._varlen_call()[2]}), flush=True)
    rows.append({"label": "check sdpa vs varlen", **losses})

    # Attention and checkpointing, before the Liger patches (they are global).
    measure("sdpa packed (dense block mask)", "sdpa", 8192)
    measure("sdpa packed + ckpt", "sdpa", 8192, (False, 1))
    measure("varlen", speed.VARLEN, 8192, profile=True)
    measure("varlen + ckpt non-reentrant", speed.VARLEN, 8192, (False, 1), profile=True)
    measure("varlen + ckpt reentrant", speed.VARLEN, 8192, (True, 1))
    measure("eager padded-equivalent (2x1024 eager, no ckpt)", "eager", 2048)
    kernels = speed.apply_kernels(base)
    print("kernels:", kernels, flush=True)
    fused = {"skip_logits": True}
    for t in (1024, 2048, 4096, 8192, 16384, 24576):
        measure("varlen + liger", speed.VARLEN, t, extra=fused)
    for t in (2048, 8192, 16384):
        measure("varlen + liger + ckpt", speed.VARLEN, t, (False, 1), extra=fused, profile=(t == 8192))
    for every in (2, 3):
        measure(f"varlen + liger + ckpt every {every}", speed.VARLEN, 8192, (False, every), extra=fused)

    # Optimizer step alone on the LoRA weights.
    import bitsandbytes as bnb

    for label, o in (("adamw fused", opt), ("paged adamw 8bit", bnb.optim.PagedAdamW8bit(params, lr=5e-5))):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        for _ in range(3):
            o.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            o.step()
        torch.cuda.synchronize()
        row = dict(label=f"optimizer step: {label}", ms=(time.perf_counter() - t) / 20 * 1e3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def check_dense(args) -> None:
    """The dequantized-weight cache computes what bitsandbytes computes: same batch, both paths."""
    import torch

    device = "cuda:0"
    shape = speed.ModelShape.from_config(argparse.Namespace(**model_shape(args)))
    train, _ = make_dataset(64, args.max_length, shape.vocab_size)
    attention = speed.choose_attention(device)
    model = load_4bit(args.model_dir, attention, device)
    collate = data_collator(None, packing=True, boundaries=attention == speed.VARLEN)
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in collate(train[:16]).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(**batch).logits.float()
        added = speed.cache_dequantized_weights(model)
        dense = model(**batch).logits.float()
    rel = float((dense - ref).norm() / ref.norm())
    print(json.dumps({"check": "dense cache vs bitsandbytes logits", "relative_error": rel, "added_gib": added / speed.GIB}), flush=True)


def cli_check(args) -> list[dict[str, Any]]:
    """The real trainer CLI (`python -m qlora_trainer --config`) on the EXAONE-format model, text QA data and a
    tokenizer built here, once per trainer package in --cli-packages (e.g. the committed one and a patched
    copy); reports wall time, tokens and peak memory from each run's summary.json."""
    import numpy as np
    import torch

    from qlora_trainer.testing import build_tokenizer, write_jsonl

    work = args.out / "cli"
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8))) for _ in range(3000)]
    perm = rng.permutation(len(words))
    records = []
    for length in np.minimum(np.rint(np.exp(np.log(300) + 0.6 * rng.standard_normal(args.examples))), 1024):
        n = max(4, int(length) // 3)  # BPE on made-up words: about three tokens a word
        q = rng.integers(0, len(words), n // 2)
        a = [words[perm[i]] for i in q]
        records.append({"question": " ".join(words[i] for i in q), "answer": " ".join(a)})
    data = write_jsonl(work / "data.jsonl", records)
    model_dir = args.model_dir
    if not (model_dir / "tokenizer.json").exists():
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        texts = words[:2000] + [r["question"] for r in records[:50]]
        build_tokenizer(texts, vocab_size=min(4000, vocab - 16)).save_pretrained(model_dir)
    rows = []
    for index, package in enumerate(p for p in args.cli_packages.split(",") if p):
        out = work / f"out-{index}-{Path(package).name or 'trainer'}"  # its own: a shared one would be resumed
        config = {
            "model": {"name": str(model_dir)},
            "dataset": {"path": str(data), "evalFraction": 0.05},
            "training": {"epochs": 1, "evalEvery": 100000, "checkpointEvery": 100000, **json.loads(args.cli_training)},
            "output": {"dir": str(out)},
            "metrics": {"port": 0},
            "terminationMessagePath": str(work / "termination.log"),
            "gpus": 1 if torch.cuda.is_available() else 0,
        }
        path = work / "config.json"
        path.write_text(json.dumps(config))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(package).resolve()), os.environ.get("PYTHONPATH", "")])}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qlora_trainer", "--config", str(path)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if "speed:" in line or "CUDA graphs" in line or "rror" in line][-6:]
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        termination = (work / "termination.log").read_text()[:600] if (work / "termination.log").exists() else ""
        row = {"package": package, "rc": proc.returncode, "process_s": wall, "log": tail, "summary": summary}
        if proc.returncode:
            row["termination"] = termination
        rows.append(row)
        print(json.dumps(row)[:3000], flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Orchestration and report


def table(results: list[dict[str, Any]]) -> str:
    guide = next((r for r in results if r.get("setting") == "guide" and "tokens_per_s" in r), None)
    lines = [
        "| setting | useful tok/s | x guide | epoch wall | peak GiB (alloc/reserved) | MFU | eval loss | vs guide | plan |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['setting']} | failed: {r.get('error', '?')} | | | | | | | |")
            continue
        wall = r["epoch_wall_s"]
        wall_s = f"{wall / 60:.1f} min" if r["epoch_measured"] else f"~{wall / 60:.1f} min (extrapolated)"
        ratio = f"{r['tokens_per_s'] / guide['tokens_per_s']:.1f}x" if guide else "-"
        loss_vs = f"{(r['eval_loss'] / guide['eval_loss'] - 1) * 100:+.1f}%" if guide else "-"
        peak = f"{r.get('peak_alloc_gib', float('nan')):.1f} / {r.get('peak_reserved_gib', float('nan')):.1f}"
        if "worst_case_peak_gib" in r:
            est = r["plan"]["estimated_peak_bytes"] / speed.GIB
            peak += f"; worst case {r['worst_case_peak_gib']:.1f} (plan: {est:.1f})"
        lines.append(
            f"| {r['setting']} | {r['tokens_per_s']:,.0f} | {ratio} | {wall_s} | {peak} | {r['mfu'] * 100:.1f}% "
            f"| {r['eval_loss']:.4f} ({r['eval_loss_after']}) | {loss_vs} | {r['plan_text']}"
            f"{'; CUDA graphs: ' + r['graphs'] if r.get('graphs') else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".bench-out")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random bf16 model is saved")
    parser.add_argument("--size", choices=sorted(SIZES), default="2.4b", help="EXAONE-3.5's shape of this size")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--max-steps", type=int, default=0, help="time only this many optimizer steps (0: the epoch)")
    parser.add_argument("--full-epoch", default="", help="settings that run the whole epoch despite --max-steps")
    parser.add_argument("--fraction", type=float, default=1.0, help="train on this fraction of the training set")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lowmem-cap", type=float, default=LOWMEM_GIB, help="GiB the lowmem setting plans for and is capped at")
    parser.add_argument("--tiny", action="store_true", help="tiny model and data: a CPU smoke run")
    parser.add_argument("--no-worst-case", dest="worst_case", action="store_false",
                        help="skip the micro-batch at the plan's token budget after training (its peak memory)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--check", action="store_true", help="check the dequantized-weight cache, then exit")
    parser.add_argument("--cli-packages", default="", help="run the trainer CLI from each of these folders")
    parser.add_argument("--cli-training", default='{"batchSize": "auto"}', help="JSON merged into the CLI's training section")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.full_epoch = [s for s in args.full_epoch.split(",") if s]
    if args.tiny:
        args.examples, args.max_length = min(args.examples, 96), min(args.max_length, 128)
    if args.model_dir is None:
        args.model_dir = args.out / ("model-tiny" if args.tiny else f"model-exaone-3.5-{args.size}")
    speed.allocator_env()

    if args.worker:
        try:
            result = run_setting(args.worker, args)
        except Exception as exc:  # noqa: BLE001 - the parent reports it in the table
            import traceback

            traceback.print_exc()
            result = {"setting": args.worker, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        (args.out / f"result-{args.worker}.json").write_text(json.dumps(result, indent=1))
        return 0

    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    build_model_dir(args.model_dir, model_shape(args), device)
    print(f"model ready in {time.perf_counter() - t:.0f}s at {args.model_dir}", flush=True)
    if args.check:
        check_dense(args)
        return 0
    if args.cli_packages:
        (args.out / "cli.json").write_text(json.dumps(cli_check(args), indent=1))
        return 0
    if args.sweep:
        rows = sweep(args)
        (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
        return 0

    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for name in [s for s in args.settings.split(",") if s]:
        t = time.perf_counter()
        cmd = [sys.executable, __file__, *passthrough, "--worker", name, "--model-dir", str(args.model_dir)]
        subprocess.run(cmd, check=False, env=os.environ.copy())
        path = args.out / f"result-{name}.json"
        result = json.loads(path.read_text()) if path.exists() else {"setting": name, "error": "no result"}
        result["process_s"] = time.perf_counter() - t
        results.append(result)
        print(json.dumps(result), flush=True)
    gpu = next((r["gpu"] for r in results if r.get("gpu")), "cpu")
    header = f"GPU: {gpu}; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: python bench/trainer_speed.py {' '.join(passthrough)}"
    text = header + "\n\n" + table(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
