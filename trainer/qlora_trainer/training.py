"""Training with the transformers `Trainer`: the arguments mapped from the config (a pure function), packed
micro-batches cut to a token budget, resume from the last valid checkpoint, and a SIGTERM that saves a
checkpoint at the next step boundary. `train(cfg)` runs a whole fine-tune and returns its summary.

The optimizer batch is always batchSize x gradientAccumulationSteps examples. Without packing that is the
Trainer's own accumulation. With packing the data loader hands over all of an optimizer step's examples at
once, packed into one row, and `QLoRATrainer.training_step` cuts that row into micro-batches of at most
batchSize x maxLength tokens (what a padded micro-batch would hold), so accumulation is a memory detail.
Either way the loss is the mean over the answer tokens of the whole optimizer step (`num_items_in_batch`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import TrainerConfig
from .contract import Phase
from .data import IGNORE_INDEX, collator, prepare_data, split_packed
from .errors import InvalidConfig
from .launch import is_main_process
from . import graphs, speed
from .checkpoints import STAGING, checkpoint_step, last_valid_checkpoint, publish_checkpoint
from .metrics import MetricsCallback, TrainerMetrics
from .model import load_model, supports_packing

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 3
DEFAULT_AUTO_BATCH_SIZE = 2  # `batchSize: auto` until the GPU work (issue 7) sizes it
LOG_FRACTION = 0.01  # the Trainer reads a logging_steps below 1 as a fraction of the run's steps
# QLORA_CUDA_GRAPHS=0 runs the decoder blocks eagerly (graphs.py): a way out, and a side-by-side for benchmarks.
CUDA_GRAPHS_ENV = "QLORA_CUDA_GRAPHS"


def cuda_graphs_wanted(env: dict[str, str]) -> bool:
    return env.get(CUDA_GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return sorted(o.value for o in OptimizerNames)


def check_optimizer(name: str) -> str:
    """The optimizer name, if the Trainer knows it; else InvalidConfig listing the names it knows."""
    names = optimizer_names()
    if name not in names:
        raise InvalidConfig(f"training.optimizer: unknown optimizer {name!r}; known: {', '.join(names)}")
    return name


def check_gpus(gpus: int) -> None:
    """A run that asks for GPUs sees one; else InvalidConfig saying that `gpus: 0` trains on the CPU (loading a
    4-bit model would otherwise fail later, as ModelLoadFailed about a missing NVIDIA driver)."""
    import torch

    if gpus > 0 and not torch.cuda.is_available():
        raise InvalidConfig(
            f"gpus: {gpus} (resources.gpus of a QLoRAFinetune), but this machine shows the trainer no GPU "
            "(no CUDA device or driver): set gpus: 0 to train on the CPU, slowly, or run where a GPU is visible")


def micro_batch_size(cfg: TrainerConfig) -> int:
    size = cfg.training.batch_size
    return DEFAULT_AUTO_BATCH_SIZE if size == "auto" else size


def training_arguments(cfg: TrainerConfig, *, has_eval: bool, packing: bool, eval_on_start: bool = False) -> TrainingArguments:
    """The `TrainingArguments` of the config: every `training` field mapped, checkpoints under
    `output.dir/checkpoints`, the last few kept."""
    t = cfg.training
    batch = micro_batch_size(cfg)
    on_gpu = cfg.gpus > 0
    return TrainingArguments(
        output_dir=str(Path(cfg.output.dir) / CHECKPOINTS),
        # With packing one loader batch is the whole optimizer step (see the module docstring).
        per_device_train_batch_size=batch * t.gradient_accumulation_steps if packing else batch,
        gradient_accumulation_steps=1 if packing else t.gradient_accumulation_steps,
        per_device_eval_batch_size=batch,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        # transformers 5 reads a float below 1 as a ratio of the total steps.
        warmup_steps=min(t.warmup_ratio, 0.999),
        optim=check_optimizer(t.optimizer),
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_every if has_eval else None,
        eval_on_start=has_eval and eval_on_start,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=t.checkpoint_every,
        save_total_limit=KEEP_CHECKPOINTS,
        logging_strategy="steps",
        # About a hundred times a run (every step of a run up to 100 steps): each logged step reads the loss and
        # gradient norm back, a host sync that keeps the next step from being issued while the GPU runs.
        logging_steps=LOG_FRACTION,
        # The filter reads the loss back every micro-batch (a host sync between the backward and the optimizer
        # step that leaves the GPU idle while the step is issued); a NaN loss is logged as NaN instead.
        logging_nan_inf_filter=False,
        report_to=list(t.report_to) if t.report_to else "none",
        bf16=cfg.quantization.compute_dtype == "bfloat16" and on_gpu,
        fp16=cfg.quantization.compute_dtype == "float16" and on_gpu,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Batches copied to the GPU from pinned memory without waiting: a blocking copy waits for the GPU to finish
        # the last step, and the next batch is then collated while the GPU idles (a host-bound step pays both).
        dataloader_pin_memory=on_gpu,
        accelerator_config={"non_blocking": on_gpu},
        ddp_find_unused_parameters=False,
        disable_tqdm=not sys.stderr.isatty(),
        include_num_input_tokens_seen="no",  # counted by QLoRATrainer: useful tokens, padding excluded
        use_cache=False,  # a KV cache would also turn off transformers' packed-sequence masks
    )


def useful_tokens(inputs: dict) -> int:
    """Tokens of a batch that are not padding."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())


class QLoRATrainer(Trainer):
    """The Trainer, plus packed micro-batches under a token budget and a count of useful tokens, and without
    the per-step walks over every module and parameter of the model that a host-bound GPU step waits for
    (a 4-bit peft model of 2.4B has about 1,600 modules and 900 parameter tensors, of which 240 train)."""

    def __init__(self, *args: Any, token_budget: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self._flops_per_token: float | None = None
        # [loss summed over answer tokens, answer tokens] of the evaluation under way; None outside one.
        self._eval_sums: list[float] | None = None
        self._trainable: list | None = None
        self._in_train_mode: Any = None
        self._staging = False  # a checkpoint is being written (_save_checkpoint)

    def _trainable_parameters(self, model) -> list:
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self._trainable

    def _clip_grad_norm(self, model):
        """Clip over the trainable parameters only (the frozen ones have no gradient to clip)."""
        return self.accelerator.clip_grad_norm_(self._trainable_parameters(model), self.args.max_grad_norm)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with bitsandbytes' updating the LoRA weights a bucket at a time instead of
        one tensor at a time (`speed.bucket_optimizer_parameters`: the same arithmetic, less host time). Not
        under fp16's gradient scaler, which unscales the gradients the optimizer's groups hold before the step
        (the bucket's are gathered at the step)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and getattr(self.accelerator, "scaler", None) is None:
            buckets = speed.bucket_optimizer_parameters(optimizer)
            if buckets:
                log.info(
                    "optimizer: %d parameters updated in %d buckets",
                    sum(len(b.members) for b in buckets), len(buckets),
                )
        return optimizer

    def _get_output_dir(self, trial) -> str:
        """Where the Trainer writes checkpoints: their staging folder while one is being saved."""
        root = super()._get_output_dir(trial)
        return str(Path(root) / STAGING) if self._staging else root

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written in the staging folder and renamed into place whole once every
        worker's files are in (checkpoints.py); then the oldest beyond the kept few go."""
        from transformers.trainer_utils import rotate_checkpoints

        root = Path(self._get_output_dir(trial))
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # each worker writes its own RNG state
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            publish_checkpoint(root / STAGING / name, root / name)
            rotate_checkpoints(str(root), save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()  # no worker reads checkpoints/ before the new one is there

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The Trainer's, after splitting the optimizer's buckets when the checkpoint's state is one tensor at a
        time (written before the trainer bucketed them): a run resumes across that upgrade. A state of another
        layout is refused rather than read past its end."""
        unbucketed = speed.per_tensor_group_sizes(self.optimizer) if checkpoint is not None else None
        if unbucketed is not None and _saved_optimizer_groups(checkpoint) == unbucketed:
            speed.split_buckets(self.optimizer)
            log.info("optimizer: %s holds one state per tensor; updating one tensor at a time", checkpoint)
        loaded = super()._load_optimizer_and_scheduler(checkpoint)
        if not speed.bucket_states_fit(self.optimizer):
            raise RuntimeError(
                f"the optimizer state in {checkpoint} does not fit this run's optimizer (written with another "
                "optimizer or trainer version?): resume from a checkpoint of this configuration, or start afresh"
            )
        return loaded

    def train(self, *args: Any, **kwargs: Any):
        """The Trainer's `train`, with `model.zero_grad()` (called after every optimizer step, a walk over every
        module and parameter) going over the trainable parameters only while it runs: the frozen ones have no
        gradient. They are looked up at the first call, after a checkpoint is loaded. A model the Trainer wraps
        (DDP) keeps the wrapper's own."""
        model = self.model
        self._trainable = None
        model.zero_grad = _zero_grads_of(lambda: self._trainable_parameters(model)).__get__(model)
        try:
            return super().train(*args, **kwargs)
        finally:
            del model.zero_grad
            stack = graphs.installed(model)
            if stack is not None:
                log.info("CUDA graphs: %s", stack.stats.describe())

    @contextlib.contextmanager
    def _train_mode_kept(self, model):
        """The Trainer puts the model in training mode before every micro-batch, a walk over every module; after
        the first walk, while the model stays in training mode, the next ones are skipped. Evaluation puts the
        model in eval mode, and the walk after it is done again. The mode is read on the model inside a
        data-parallel wrapper too: evaluation runs the unwrapped model, so the wrapper stays in training mode
        while the model in it (its LoRA dropout) is in eval mode."""
        inner = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        if self._in_train_mode is not model or not model.training or not inner.training:
            model.train()
            self._in_train_mode = model
        model.train = _keep_mode.__get__(model)
        try:
            yield
        finally:
            del model.train

    def floating_point_ops(self, inputs: dict) -> float:
        """The Trainer's FLOPs estimate (6 x parameters x tokens) with the parameters counted once: transformers
        walks every module and parameter of the model again on every micro-batch, host time a GPU waits for."""
        import torch

        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs:
            return 0.0
        if self._flops_per_token is None:
            self._flops_per_token = float(super().floating_point_ops({main: torch.empty(1)}))
        return self._flops_per_token * inputs[main].numel()

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.state.num_input_tokens_seen += self._tokens_everywhere(useful_tokens(inputs))
        if self.token_budget is None or "position_ids" not in inputs or num_items_in_batch is None:
            with self._train_mode_kept(model):
                return super().training_step(model, inputs, num_items_in_batch)
        parts = split_packed(inputs, self.token_budget)
        total = None
        for i, part in enumerate(parts):
            # Gradients of all parts add up before DDP syncs once, on the last.
            sync = contextlib.nullcontext() if i == len(parts) - 1 else self.accelerator.no_sync(model)
            with sync, self._train_mode_kept(model):
                loss = super().training_step(model, part, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The tokens the batch's mean loss is over: the labels a causal LM scores (shifted by one), counted
        # before the Trainer may pop them.
        labels = inputs.get("labels")
        tokens = int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else 0
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if loss is not None and self._eval_sums is not None and tokens:
            self._eval_sums[0] += float(loss) * tokens  # one sync per evaluation batch: evaluation is rare
            self._eval_sums[1] += tokens
        return loss, logits, labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's evaluation, with the eval loss the mean over every answer token of the eval set, as the
        training loss is, rather than the mean of each batch's mean (which weighs a token of a short batch more
        than one of a long batch)."""
        self._eval_sums = [0.0, 0]
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            sums, self._eval_sums = self._eval_sums, None
        total, tokens = self._summed_everywhere(sums)
        if tokens:
            output.metrics[f"{metric_key_prefix}_loss"] = total / tokens
        return output

    def _summed_everywhere(self, values: list[float]) -> list[float]:
        """`values` summed over the data-parallel workers."""
        if self.args.world_size <= 1:
            return values
        import torch

        summed = self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.args.device), "sum")
        return summed.tolist()

    def _tokens_everywhere(self, tokens: int) -> int:
        """This micro-batch's useful tokens summed over the data-parallel workers (as the Trainer's own
        `include_num_input_tokens_seen` does), so every rank reports the run's total."""
        return int(self._summed_everywhere([tokens])[0])


def _zero_grads_of(parameters):
    """A `zero_grad` for a model whose only gradients are those of `parameters()` (as nn.Module's, without the
    walk over every module)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        speed.clear_grads(parameters(), set_to_none)

    return zero_grad


def _saved_optimizer_groups(checkpoint) -> list[int] | None:
    """How many parameters each group of a checkpoint's optimizer state holds (None without one)."""
    import torch
    from transformers.trainer import OPTIMIZER_NAME

    path = Path(checkpoint) / OPTIMIZER_NAME
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return [len(g["params"]) for g in saved["param_groups"]]


def _keep_mode(self, mode: bool = True):
    """`model.train` while `QLoRATrainer._train_mode_kept` holds: already in training mode, so nothing to walk."""
    if mode:
        return self
    return type(self).train(self, mode)


class StopOnSignal(TrainerCallback):
    """SIGTERM: save a checkpoint and stop at the next step boundary. Before training starts, exit at once
    (`Terminated`), as nothing is lost yet.

    `signalled` is this process's SIGTERM, set by the handler alone; `requested` is the workers' agreement to
    stop, set at a step's end alone. Kept apart because the handler runs between any two bytecodes: were the
    agreement written over the flag, a SIGTERM landing during the all-reduce would be overwritten and lost."""

    def __init__(self) -> None:
        self.signalled = False
        self.requested = False
        self.training = False
        self.saving = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = True
        if self.saving:
            log.warning("SIGTERM: stopping once the outputs are written")
            return
        log.warning("SIGTERM: %s", "saving a checkpoint at the end of this step" if self.training else "stopping")
        if not self.training:
            raise Terminated("stopped by SIGTERM outside training (nothing since the last checkpoint is lost)")

    @contextlib.contextmanager
    def deferred(self):
        """The final outputs being written: a SIGTERM waits for them (a kill still may not, and finds them
        staged aside, never half-written in place)."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._anywhere(self.signalled, args.device):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True

    @staticmethod
    def _anywhere(flag: bool, device) -> bool:
        """Whether any worker of a data-parallel run was signalled: all must stop at the same step, or the
        ones that go on would wait for the others forever."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False


class Terminated(BaseException):
    """The run was asked to stop (SIGTERM); not a failure. A BaseException, so that no `except Exception`
    on the way (model loading wraps errors) mistakes it for a failure."""


def resume_position(checkpoint: Path) -> dict[str, Any]:
    """Where a run resumed from `checkpoint` goes on: its step, epoch and total steps (trainer_state.json)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {"step": int(state.get("global_step") or checkpoint_step(checkpoint)),
            "epoch": float(state.get("epoch") or 0.0), "total_steps": int(state.get("max_steps") or 0)}


def same_checkpoint_everywhere(resume: Path | None) -> None:
    """Every worker of a data-parallel run looks for its checkpoint in output.dir on its own node; they must
    all resume from the same one, or the replicas would train on from different steps. Workers on nodes that
    do not share the output volume find different ones (or none)."""
    import torch.distributed as dist

    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, str(resume) if resume else None)
    if len(set(found)) > 1:
        seen = ", ".join(f"worker {rank}: {path or 'none'}" for rank, path in enumerate(found))
        raise InvalidConfig(
            f"the workers found different checkpoints to resume from ({seen}): every node must see the same "
            "output.pvc, a volume all of them mount (ReadWriteMany across nodes)")
    if resume is not None:
        log.info("every worker resumes from %s", resume)


def train(cfg: TrainerConfig, metrics: TrainerMetrics | None = None, stop: StopOnSignal | None = None) -> dict:
    """Load, train, evaluate and save one fine-tune; returns the run summary (see output.run_summary).
    Raises the errors of errors.py, or Terminated after a SIGTERM checkpoint."""
    from transformers import set_seed

    from .output import run_summary, save_outputs

    started = time.time()
    metrics = metrics or TrainerMetrics()
    stop = stop or StopOnSignal()
    metrics.set_phase(Phase.LOADING)
    check_optimizer(cfg.training.optimizer)  # fail before the slow part
    check_gpus(cfg.gpus)
    resume = last_valid_checkpoint(Path(cfg.output.dir) / CHECKPOINTS)
    if is_main_process():  # the other workers write there only at the first save, many steps on
        shutil.rmtree(Path(cfg.output.dir) / CHECKPOINTS / STAGING, ignore_errors=True)  # a stopped save's
    if resume is not None:
        # Said before the slow load, so that a retry's status shows where it goes on from while it loads.
        log.info("resuming from %s", resume)
        metrics.resuming(**resume_position(resume))
    set_seed(cfg.training.seed)  # LoRA init is random
    model, tokenizer = load_model(cfg)
    data = prepare_data(cfg.dataset, tokenizer, cfg.training.max_length, cfg.training.seed)
    s = data.stats
    log.info(
        "data: %d records (%s), %d train / %d eval examples, %d truncated at %d tokens, %d skipped without answer",
        s.records, s.format, s.train_examples, s.eval_examples, s.truncated, cfg.training.max_length, s.skipped_no_answer,
    )
    packing = cfg.training.packing and supports_packing(model)
    if cfg.training.packing and not packing:
        log.warning("packing is off: this model's attention (remote code?) cannot read packed rows; padding instead")
    t = cfg.training
    fast = speed.configure(
        model,
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length,
        lengths=[len(x["input_ids"]) for x in data.train],
        gradient_checkpointing=t.gradient_checkpointing,
        packing=packing,
        total_steps=t.max_steps or t.epochs * -(-len(data.train) // (micro_batch_size(cfg) * t.gradient_accumulation_steps)),
        cuda_graphs=cuda_graphs_wanted(os.environ),
    )
    log.info("speed: %s", fast.describe())
    args = training_arguments(cfg, has_eval=bool(data.eval), packing=packing, eval_on_start=resume is None)
    if args.world_size > 1:  # the arguments joined the process group: say which worker this log is of
        import torch.distributed as dist

        log.info("data parallel: worker %d of %d (%s)", args.process_index, args.world_size, dist.get_backend())
        same_checkpoint_everywhere(resume)
    if fast.owns_checkpointing:
        args.activation_checkpointing = False  # speed.configure set it per block
    if fast.padded_batch:
        args.per_device_train_batch_size, args.gradient_accumulation_steps = fast.padded_batch
    callback = MetricsCallback(metrics, log_every=max(1, (cfg.training.max_steps or 100) // 100))
    trainer = QLoRATrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        data_collator=collator(tokenizer, packing, boundaries=fast.attention == speed.VARLEN),
        processing_class=tokenizer,
        callbacks=[callback, stop],
        token_budget=(fast.token_budget or micro_batch_size(cfg) * cfg.training.max_length) if packing else None,
    )
    trainer.remove_callback(PrinterCallback)  # MetricsCallback writes the log lines
    finished = resume is not None and 0 < resume_position(resume)["total_steps"] <= resume_position(resume)["step"]
    if finished:
        # The checkpoint is the run's last step (stopped while evaluating or writing the outputs): the Trainer
        # would take one step more before it checks the count, so only its weights and state are loaded.
        from transformers import TrainerState

        log.info("%s is the run's last step: no training left", resume)
        trainer._load_from_checkpoint(str(resume))
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.requested:
        raise Terminated(f"stopped by SIGTERM at step {trainer.state.global_step}; checkpoint saved")

    history = trainer.state.log_history
    if data.eval and not any(e.get("step") == trainer.state.global_step and "eval_loss" in e for e in history):
        metrics.set_phase(Phase.EVALUATING)
        trainer.evaluate()
    metrics.set_phase(Phase.SAVING)
    summary = run_summary(cfg, trainer.state, data.stats, metrics, started)
    if trainer.is_world_process_zero():
        with stop.deferred():  # a SIGTERM now waits for the outputs to be whole: the run is done
            save_outputs(cfg, trainer.model, tokenizer, summary)
    metrics.set_phase(Phase.DONE)
    return summary
