"""The Prometheus metrics of shared/API.md (names in contract.Metric), kept current by a `TrainerCallback`
and served by prometheus_client's own HTTP server from the start of loading. The same callback writes the
human progress lines of the log.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, start_http_server

from .contract import Metric, Phase

try:  # the callback base class; the metrics themselves work without transformers
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - the trainer image always has transformers
    TrainerCallback = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

_HELP = {
    Metric.STEP: "Optimizer steps done.",
    Metric.TOTAL_STEPS: "Optimizer steps this run will take.",
    Metric.EPOCH: "Epochs done (fractional).",
    Metric.LOSS: "Last training loss logged (mean per answer token over the optimizer steps since the log before).",
    Metric.EVAL_LOSS: "Last evaluation loss (mean per answer token over the eval set).",
    Metric.LEARNING_RATE: "Learning rate of the last step.",
    Metric.GRAD_NORM: "Gradient norm of the last step, before clipping.",
    Metric.TOKENS_PER_SECOND: "Useful (non-padding) tokens trained per second since training (re)started.",
    Metric.GPU_MEMORY_PEAK_BYTES: "Peak GPU memory allocated by this process (0 on the CPU).",
    Metric.ETA_SECONDS: "Estimated seconds until training ends.",
    Metric.LAST_CHECKPOINT_STEP: "Step of the last checkpoint saved (0: none yet).",
    Metric.START_TIME_SECONDS: "Unix time the trainer started.",
}


def gpu_peak_bytes() -> int:
    """Peak GPU memory allocated by this process; 0 without CUDA."""
    try:
        import torch

        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0
    except Exception:  # metrics never break training
        return 0


class TrainerMetrics:
    """The trainer's series on a registry of their own; `values` mirrors the last value of each."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauges = {m: Gauge(m.full, help_, registry=self.registry) for m, help_ in _HELP.items()}
        self.tokens = Counter(Metric.TOKENS_TOTAL.full, "Useful (non-padding) tokens trained on.", registry=self.registry)
        self.phase = Enum(
            Metric.PHASE.full, "What the trainer is doing.", states=[p.value for p in Phase], registry=self.registry
        )
        self.values: dict[Metric, Any] = {Metric.TOKENS_TOTAL: 0}
        # No estimate before the first timed step: NaN reads as "not known yet", where 0 would say "done".
        self.gauges[Metric.ETA_SECONDS].set(float("nan"))
        self.set(Metric.START_TIME_SECONDS, time.time())
        self.set_phase(Phase.LOADING)
        self.server = None

    def set(self, metric: Metric, value: float | None) -> None:
        if value is None:
            return
        self.gauges[metric].set(value)
        self.values[metric] = value

    def resuming(self, step: int, epoch: float, total_steps: int) -> None:
        """Publish, while still loading, the position a resumed run goes on from (its checkpoint's)."""
        self.set(Metric.LAST_CHECKPOINT_STEP, step)
        self.set(Metric.STEP, step)
        self.set(Metric.EPOCH, epoch)
        self.set(Metric.TOTAL_STEPS, total_steps or None)

    def add_tokens(self, count: int) -> None:
        if count > 0:
            self.tokens.inc(count)
            self.values[Metric.TOKENS_TOTAL] += count

    def set_phase(self, phase: Phase) -> None:
        self.phase.state(phase.value)
        self.values[Metric.PHASE] = phase.value

    def serve(self, port: int, host: str | None = None) -> None:
        """Serve /metrics on `host` (else $POD_IP, else all interfaces) and `port`; port 0 serves nothing."""
        if port == 0:
            return
        address = host or os.environ.get("POD_IP") or "0.0.0.0"
        self.server, _ = start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", address, port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class MetricsCallback(TrainerCallback):
    """Keeps `TrainerMetrics` current from the Trainer's events and logs a progress line per logged step."""

    def __init__(self, metrics: TrainerMetrics, log_every: int = 1) -> None:
        self.metrics = metrics
        self.log_every = max(1, log_every)
        self._clock = time.monotonic()
        self._first_step = 0
        self._tokens_seen = 0
        self._first_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        m = self.metrics
        self._clock, self._first_step = time.monotonic(), state.global_step
        self._tokens_seen = self._first_tokens = state.num_input_tokens_seen
        # A resumed run continues the counter where the checkpoint left it.
        m.add_tokens(state.num_input_tokens_seen - m.values[Metric.TOKENS_TOTAL])
        m.set(Metric.TOTAL_STEPS, state.max_steps)
        m.set(Metric.STEP, state.global_step)
        m.set(Metric.EPOCH, state.epoch or 0.0)
        m.set_phase(Phase.TRAINING)

    def on_step_end(self, args, state, control, **kwargs):
        m = self.metrics
        m.set(Metric.STEP, state.global_step)
        m.set(Metric.EPOCH, state.epoch)
        m.add_tokens(state.num_input_tokens_seen - self._tokens_seen)
        self._tokens_seen = state.num_input_tokens_seen
        elapsed = max(time.monotonic() - self._clock, 1e-9)
        m.set(Metric.TOKENS_PER_SECOND, (self._tokens_seen - self._first_tokens) / elapsed)
        done = state.global_step - self._first_step
        if done > 0:
            m.set(Metric.ETA_SECONDS, (state.max_steps - state.global_step) * elapsed / done)
        m.set(Metric.GPU_MEMORY_PEAK_BYTES, gpu_peak_bytes())
        if control.should_evaluate:
            m.set_phase(Phase.EVALUATING)
        elif control.should_save:
            m.set_phase(Phase.SAVING)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.metrics.set_phase(Phase.SAVING if control.should_save else Phase.TRAINING)

    def on_save(self, args, state, control, **kwargs):
        self.metrics.set(Metric.LAST_CHECKPOINT_STEP, state.global_step)
        self.metrics.set_phase(Phase.TRAINING)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        m = self.metrics
        m.set(Metric.LOSS, logs.get("loss"))
        m.set(Metric.LEARNING_RATE, logs.get("learning_rate"))
        m.set(Metric.GRAD_NORM, logs.get("grad_norm"))
        m.set(Metric.EVAL_LOSS, logs.get("eval_loss"))
        if "eval_loss" in logs:
            log.info("step %d/%d: eval loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])
        elif "loss" in logs and (state.global_step % self.log_every == 0 or state.global_step == state.max_steps):
            v = m.values
            log.info(
                "step %d/%d (%d%%) epoch %.2f: loss %.4f, lr %.2e, grad norm %.3f, %.0f tokens/s, eta %s",
                state.global_step, state.max_steps, 100 * state.global_step // max(state.max_steps, 1),
                state.epoch or 0.0, logs["loss"], logs.get("learning_rate", 0.0), logs.get("grad_norm") or 0.0,
                v.get(Metric.TOKENS_PER_SECOND, 0.0), timedelta(seconds=round(v.get(Metric.ETA_SECONDS, 0.0))),
            )
