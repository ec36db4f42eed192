"""What a run leaves behind: the adapter (safetensors), the tokenizer, the resolved config, `summary.json`,
a merged model when asked, and the exit summary for the termination-message path (at most 4 KiB).

Summary keys (camelCase, like the API): status (`Succeeded`, `Failed`, `Terminated`), reason and exitCode,
message, step, totalSteps, epoch, loss, evalLoss, initialEvalLoss, tokensTotal, examples, truncated,
lastCheckpoint {step, path}, outputPath, durationSeconds, gpuMemoryPeakBytes, versions.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoints import OUTPUTS_STAGING, publish_outputs
from .config import TrainerConfig
from .contract import EXIT_SUCCESS, TERMINATION_MESSAGE_LIMIT, Metric
from .metrics import TrainerMetrics, gpu_peak_bytes

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "trainer-config.json"
MERGED_DIR = "merged"
STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


def versions() -> dict[str, str]:
    found = {"qlora_trainer": __version__}
    for package in STACK:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def run_summary(cfg: TrainerConfig, state, stats, metrics: TrainerMetrics, started: float) -> dict[str, Any]:
    """The summary of a finished run, from the Trainer's state, the data stats and the last metric values."""
    history = state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    values = metrics.values
    checkpoint_step = values.get(Metric.LAST_CHECKPOINT_STEP)
    return {
        "status": "Succeeded",
        "exitCode": EXIT_SUCCESS,
        "step": state.global_step,
        "totalSteps": state.max_steps,
        "epoch": state.epoch,
        "loss": losses[-1] if losses else None,
        "evalLoss": evals[-1]["eval_loss"] if evals else None,
        "initialEvalLoss": evals[0]["eval_loss"] if evals and evals[0].get("step") == 0 else None,
        "tokensTotal": state.num_input_tokens_seen,
        "examples": {"train": stats.train_examples, "eval": stats.eval_examples, "format": stats.format},
        "truncated": stats.truncated,
        "skippedNoAnswer": stats.skipped_no_answer,
        "lastCheckpoint": {
            "step": checkpoint_step,
            "path": str(Path(cfg.output.dir) / "checkpoints" / f"checkpoint-{checkpoint_step}"),
        }
        if checkpoint_step
        else None,
        "outputPath": cfg.output.dir,
        "durationSeconds": round(time.time() - started, 3),
        "gpuMemoryPeakBytes": gpu_peak_bytes(),
        "tokensPerSecond": values.get(Metric.TOKENS_PER_SECOND),
        "versions": versions(),
    }


def failure_summary(status: str, exit_code: int, message: str, reason: str | None, metrics: TrainerMetrics | None) -> dict[str, Any]:
    """The summary of a run that failed or was stopped: the reason, the message and the last values seen."""
    values = metrics.values if metrics else {}
    summary: dict[str, Any] = {"status": status, "reason": reason, "exitCode": exit_code, "message": message}
    for key, metric in (
        ("step", Metric.STEP), ("totalSteps", Metric.TOTAL_STEPS), ("epoch", Metric.EPOCH), ("loss", Metric.LOSS),
        ("evalLoss", Metric.EVAL_LOSS), ("tokensTotal", Metric.TOKENS_TOTAL),
    ):
        if metric in values:
            summary[key] = values[metric]
    if values.get(Metric.LAST_CHECKPOINT_STEP):
        summary["lastCheckpoint"] = {"step": values[Metric.LAST_CHECKPOINT_STEP]}
    summary["gpuMemoryPeakBytes"] = gpu_peak_bytes()
    return summary


def termination_message(summary: dict[str, Any], limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """Compact JSON of the summary within `limit` bytes: versions go first, then the message is shortened."""
    text = json.dumps(summary, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) <= limit:
        return text
    summary = {k: v for k, v in summary.items() if k != "versions"}
    text = json.dumps(summary, separators=(",", ":"), ensure_ascii=False)
    message = str(summary.get("message", ""))
    while len(text.encode()) > limit and message:
        over = len(text.encode()) - limit
        message = message[: max(0, len(message) - over - 3)] + "..." if len(message) > over + 3 else ""
        summary["message"] = message
        text = json.dumps(summary, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > limit:  # nothing long left to cut: keep only what the operator must see
        keep = ("status", "reason", "exitCode", "message", "step")
        text = json.dumps({k: summary.get(k) for k in keep}, separators=(",", ":"), ensure_ascii=False)
    return text


def write_termination_message(path: str, summary: dict[str, Any]) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(termination_message(summary), encoding="utf-8")
    except OSError as err:  # e.g. no /dev/termination-log outside Kubernetes
        log.info("termination message not written to %s: %s", path, err)


def save_outputs(cfg: TrainerConfig, model, tokenizer, summary: dict[str, Any]) -> None:
    """Adapter, tokenizer, resolved config and summary.json into output.dir, and the merged model when asked:
    written aside first and moved in whole, summary.json last (checkpoints.publish_outputs)."""
    out = Path(cfg.output.dir)
    staged = out / OUTPUTS_STAGING
    if staged.exists():
        shutil.rmtree(staged)  # what a stopped attempt before left
    staged.mkdir(parents=True)
    model.save_pretrained(staged, safe_serialization=True)
    tokenizer.save_pretrained(staged)
    (staged / CONFIG_FILE).write_text(json.dumps(cfg.to_wire(), indent=2, ensure_ascii=False), encoding="utf-8")
    if cfg.output.merge_adapter:
        merged = merge_adapter(cfg, staged)
        summary["mergedPath"] = str(out / merged.name)
    (staged / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    publish_outputs(staged, out, last=SUMMARY_FILE)
    log.info("adapter, tokenizer and summary written to %s", out)


def merge_adapter(cfg: TrainerConfig, adapter_dir: Path) -> Path:
    """Load the base unquantized in compute dtype on the CPU, merge the adapter in, save to `merged` beside
    the adapter."""
    from peft import PeftModel

    from .model import load_base_model, load_tokenizer

    base = load_base_model(cfg, quantized=False)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target = adapter_dir / MERGED_DIR
    merged.save_pretrained(target, safe_serialization=True)
    load_tokenizer(cfg).save_pretrained(target)
    log.info("merged model written to %s", target)
    return target
