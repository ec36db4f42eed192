"""The trainer's Prometheus metrics, read and mapped onto a `QLoRAFinetune`'s status.

One concern: reading (straight from the pod's `/metrics`, or through a Prometheus server's query API) and
mapping (pure functions from what was read to status fields). Names come from `qlora_trainer.contract`, the
one place that names the metrics. When to read and how the fields join the status is metrics_feed.py's; the
decisions it needs (what the status says, whether values are stale, whether a patch is due) are pure and
live here.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families
from qlora_trainer.contract import METRIC_PREFIX, METRICS_PATH, METRICS_PORT, Metric, Phase

DEFAULT_TIMEOUT = 3.0
DEFAULT_CONCURRENCY = 16
# The trainer's exposition is a few KiB; anything far larger is not the trainer.
MAX_RESPONSE_BYTES = 1 << 20
# Labels a PodMonitor (prometheus-operator) and the usual kubernetes_sd relabelling give every series.
NAMESPACE_LABEL = "namespace"
POD_LABEL = "pod"
# The estimated completion time moves with the clock between reads; a shift smaller than this is no change.
COMPLETION_TIME_TOLERANCE = timedelta(seconds=60)

# The trainer's phase -> the reason of the resource's `Running` condition (one CamelCase word).
RUNNING_REASONS: dict[Phase, str] = {
    Phase.LOADING: "Loading",
    Phase.TRAINING: "Training",
    Phase.EVALUATING: "Evaluating",
    Phase.SAVING: "Saving",
}

# Status fields this module writes; a patch built from them touches nothing else.
METRIC_FIELDS = (
    "progress", "step", "totalSteps", "epoch", "loss", "evalLoss", "learningRate", "gradNorm",
    "tokensPerSecond", "gpuMemoryPeakBytes", "eta", "estimatedCompletionTime", "lastCheckpoint",
)


class MetricsUnreadable(Exception):
    """The metrics could not be read or made no sense; `str(err)` is one short line for `status.message`."""


@dataclass(frozen=True)
class TrainerSample:
    """One reading of the trainer's series; a field is None when the trainer has not reported it yet."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    tokens_total: int | None = None
    gpu_memory_peak_bytes: int | None = None
    eta_seconds: float | None = None
    last_checkpoint_step: int | None = None
    start_time_seconds: float | None = None
    phase: Phase | None = None


# Exported series name -> (TrainerSample field, type). `phase` is read apart: it is a state set.
_SERIES: dict[str, tuple[str, type]] = {
    Metric.STEP.full: ("step", int),
    Metric.TOTAL_STEPS.full: ("total_steps", int),
    Metric.EPOCH.full: ("epoch", float),
    Metric.LOSS.full: ("loss", float),
    Metric.EVAL_LOSS.full: ("eval_loss", float),
    Metric.LEARNING_RATE.full: ("learning_rate", float),
    Metric.GRAD_NORM.full: ("grad_norm", float),
    Metric.TOKENS_PER_SECOND.full: ("tokens_per_second", float),
    Metric.TOKENS_TOTAL.full: ("tokens_total", int),
    Metric.GPU_MEMORY_PEAK_BYTES.full: ("gpu_memory_peak_bytes", int),
    Metric.ETA_SECONDS.full: ("eta_seconds", float),
    Metric.LAST_CHECKPOINT_STEP.full: ("last_checkpoint_step", int),
    Metric.START_TIME_SECONDS.full: ("start_time_seconds", float),
}
_PHASES = {p.value: p for p in Phase}


# ------------------------------------------------------------------------------------------- reading

def sample_from_series(series: Iterable[tuple[str, Mapping[str, str], float]]) -> TrainerSample:
    """Build a sample from (series name, labels, value) triples, whichever way they were read.

    NaN and infinite values mean "not known yet" and are left out; negative values are left out of the
    fields that cannot be negative. Raises MetricsUnreadable when no series of the trainer is among them.
    """
    values: dict[str, Any] = {}
    phase: Phase | None = None
    seen = False
    for name, labels, value in series:
        if not name.startswith(METRIC_PREFIX):
            continue
        seen = True
        if name == Metric.PHASE.full:
            # A state set: one series per state, 1 for the current one. The state is the value of the label
            # named after the metric (prometheus_client's Enum), or of any label naming a known phase.
            if value == 1:
                for label_value in _state_labels(labels):
                    phase = _PHASES[label_value]
            continue
        target = _SERIES.get(name)
        if target is None or not math.isfinite(value):
            continue
        attr, kind = target
        if value < 0 and attr != "start_time_seconds":
            continue
        values[attr] = int(round(value)) if kind is int else float(value)
    if not seen:
        raise MetricsUnreadable(f"no {METRIC_PREFIX}* series in the response")
    return TrainerSample(**values, phase=phase)


def _state_labels(labels: Mapping[str, str]) -> list[str]:
    own = labels.get(Metric.PHASE.full)
    if own in _PHASES:
        return [own]
    return [v for k, v in labels.items() if k != "__name__" and v in _PHASES][:1]


def parse_exposition(text: str) -> TrainerSample:
    """Read Prometheus text exposition (what the trainer serves on `/metrics`)."""
    try:
        triples = [
            (s.name, s.labels, float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
    except Exception as err:  # the parser raises ValueError, and others on odd input; all mean garbled
        raise MetricsUnreadable(f"garbled metrics: {_one_line(err)}") from err
    return sample_from_series(triples)


def parse_query_response(document: Mapping[str, Any]) -> TrainerSample:
    """Read the JSON answer of Prometheus' `/api/v1/query` to `promql_selector(...)` (a vector)."""
    if document.get("status") != "success":
        raise MetricsUnreadable(f"Prometheus query failed: {_one_line(document.get('error', 'no status'))}")
    data = document.get("data") or {}
    if data.get("resultType") != "vector":
        raise MetricsUnreadable(f"Prometheus answered a {data.get('resultType')!r}, not a vector")
    triples = []
    try:
        for item in data.get("result") or []:
            labels = item["metric"]
            triples.append((labels["__name__"], labels, float(item["value"][1])))
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise MetricsUnreadable(f"Prometheus answered an unexpected shape: {_one_line(err)}") from err
    if not triples:
        raise MetricsUnreadable("Prometheus has no trainer series for this pod (not scraped yet, or down)")
    return sample_from_series(triples)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def promql_selector(namespace: str, pod: str, namespace_label: str = NAMESPACE_LABEL,
                    pod_label: str = POD_LABEL) -> str:
    """The PromQL selector of one trainer pod's series.

    `namespace` and `pod` are the labels a PodMonitor gives every target, and the ones a plain
    kubernetes_sd scrape config sets by relabelling `__meta_kubernetes_namespace` and
    `__meta_kubernetes_pod_name` (see tests/prometheus_server.py); other label names can be passed.
    """
    return (f'{{__name__=~"{METRIC_PREFIX}.*", {namespace_label}="{_label_value(namespace)}", '
            f'{pod_label}="{_label_value(pod)}"}}')


def metrics_url(pod_ip: str, port: int = METRICS_PORT) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}{METRICS_PATH}"


def redact_url(url: str) -> str:
    """`url` without credentials (`http://user:secret@prom:9090` -> `http://***@prom:9090`), for logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _one_line(err: object, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MetricsReader:
    """Reads trainer metrics over HTTP for many resources at once, with at most `concurrency` reads in flight.

    Straight from the pod by default; through Prometheus' query API when `prometheus_url` is given. One
    aiohttp session is shared by every read; `close()` it on shutdown.
    """

    def __init__(self, prometheus_url: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 concurrency: int = DEFAULT_CONCURRENCY, port: int = METRICS_PORT,
                 namespace_label: str = NAMESPACE_LABEL, pod_label: str = POD_LABEL):
        self.prometheus_url = prometheus_url.rstrip("/") if prometheus_url else None
        self.timeout = timeout
        self.port = port
        self.namespace_label = namespace_label
        self.pod_label = pod_label
        self._limit = asyncio.Semaphore(concurrency)
        self._session = None

    def _http(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def read(self, namespace: str, pod: str, pod_ip: str | None) -> TrainerSample:
        """One reading of one pod's trainer; raises MetricsUnreadable with a short reason on any failure."""
        async with self._limit:
            try:
                if self.prometheus_url:
                    return await self._query(namespace, pod)
                if not pod_ip:
                    raise MetricsUnreadable("the pod has no IP yet")
                return await self._scrape(pod_ip)
            except MetricsUnreadable:
                raise
            except asyncio.TimeoutError as err:
                raise MetricsUnreadable(f"no answer within {self.timeout:g}s") from err
            except Exception as err:  # connection refused, reset, DNS, ...: all mean "not readable now"
                raise MetricsUnreadable(_one_line(err)) from err

    async def _scrape(self, pod_ip: str) -> TrainerSample:
        url = metrics_url(pod_ip, self.port)
        async with self._http().get(url) as resp:
            if resp.status != 200:
                raise MetricsUnreadable(f"{url} answered HTTP {resp.status}")
            text = await _bounded_text(resp)
        return parse_exposition(text)

    async def _query(self, namespace: str, pod: str) -> TrainerSample:
        query = promql_selector(namespace, pod, self.namespace_label, self.pod_label)
        async with self._http().get(f"{self.prometheus_url}/api/v1/query", params={"query": query}) as resp:
            body = await _bounded_text(resp)
            if resp.status != 200 and not body.lstrip().startswith("{"):
                raise MetricsUnreadable(f"Prometheus answered HTTP {resp.status}")
        try:
            document = json.loads(body)
        except ValueError as err:
            raise MetricsUnreadable(f"Prometheus answered no JSON: {_one_line(err)}") from err
        return parse_query_response(document)


async def _bounded_text(resp) -> str:
    data = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > MAX_RESPONSE_BYTES:
            raise MetricsUnreadable(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------- mapping

def format_duration(seconds: float) -> str:
    """`45s`, `3m12s`, `2h5m0s`: whole seconds, the way Go (and kubectl) print durations."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def format_progress(step: int, total_steps: int) -> str:
    """`42%`, rounded down so `100%` means done; clamped to 0-100."""
    if total_steps <= 0:
        return "0%"
    return f"{max(0, min(100, (100 * step) // total_steps))}%"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None


def _significant(value: float, digits: int = 4) -> float:
    # Rounded so that noise in the last bits is no reason to patch, and `kubectl get` stays readable.
    return float(f"{value:.{digits}g}")


def checkpoint_path(output_path: str, step: int) -> str:
    """Where the trainer keeps the checkpoint of `step` under the run's output folder."""
    return f"{output_path.rstrip('/')}/checkpoints/checkpoint-{step}"


def status_fields(sample: TrainerSample, now: datetime, output_path: str | None) -> dict[str, Any]:
    """The status fields a reading gives; fields the trainer has not reported are left out, so a merge
    patch keeps whatever status had."""
    out: dict[str, Any] = {}
    if sample.phase is Phase.LOADING:
        if not sample.step:
            # A fresh start, or a retry that has not yet said where it resumes: nothing to show yet.
            return out
        # A retry publishes the position of the checkpoint it resumes from while it loads: that is where the
        # run stands now. Nothing is training, so no time left is estimated.
        return {**_position(sample), **_checkpoint(sample, output_path), "eta": None, "estimatedCompletionTime": None}
    out.update(_position(sample))
    if sample.step:
        # Gauges read 0 until their first value; a loss of exactly 0 is never a real one.
        for attr, key in (("loss", "loss"), ("eval_loss", "evalLoss"), ("learning_rate", "learningRate"),
                          ("grad_norm", "gradNorm")):
            value = getattr(sample, attr)
            if value is not None and (value != 0 or attr in ("learning_rate", "grad_norm")):
                out[key] = _significant(value)
        if sample.tokens_per_second is not None:
            out["tokensPerSecond"] = round(sample.tokens_per_second, 1)
        if sample.eta_seconds is not None and sample.phase not in (Phase.DONE, Phase.FAILED):
            out["eta"] = format_duration(sample.eta_seconds)
            out["estimatedCompletionTime"] = rfc3339(now + timedelta(seconds=sample.eta_seconds))
    if sample.gpu_memory_peak_bytes:
        out["gpuMemoryPeakBytes"] = sample.gpu_memory_peak_bytes
    out.update(_checkpoint(sample, output_path))
    return out


def _position(sample: TrainerSample) -> dict[str, Any]:
    """Where the run stands: step, total steps, progress and epoch, as far as the sample tells."""
    out: dict[str, Any] = {}
    if sample.step is not None:
        out["step"] = sample.step
    if sample.total_steps:
        out["totalSteps"] = sample.total_steps
        if sample.step is not None:
            out["progress"] = format_progress(sample.step, sample.total_steps)
    if sample.epoch is not None:
        out["epoch"] = round(sample.epoch, 2)
    return out


def _checkpoint(sample: TrainerSample, output_path: str | None) -> dict[str, Any]:
    if not sample.last_checkpoint_step:
        return {}
    checkpoint: dict[str, Any] = {"step": sample.last_checkpoint_step}
    if output_path:
        checkpoint["path"] = checkpoint_path(output_path, sample.last_checkpoint_step)
    return {"lastCheckpoint": checkpoint}


def running_reason(sample: TrainerSample | None) -> str | None:
    """The `Running` condition's reason for the trainer's phase; None when the phase says nothing new."""
    if sample is None or sample.phase is None:
        return None
    return RUNNING_REASONS.get(sample.phase)


# --------------------------------------------------------------------------- staleness, per resource

@dataclass(frozen=True)
class MetricsTrack:
    """What the operator remembers of one resource's metrics between reads.

    `pod` is the pod last read and `values_pod` the pod `last_good` came from: after a retry the previous
    attempt's values are kept until the new pod's own arrive. `resumed_from`: the checkpoint step the retry
    went on from, once its readings show it; `started_over`: the retry found no checkpoint and began at step 0;
    `left_at`: the last step read from the attempt before, to tell whether the retry went back.
    """

    pod: str | None = None
    last_good: TrainerSample | None = None
    last_good_at: datetime | None = None
    stale_since: datetime | None = None
    error: str | None = None
    values_pod: str | None = None
    resumed_from: int | None = None
    started_over: bool = False
    left_at: int | None = None
    # The pod followed another one and has not yet shown whether it resumed from a checkpoint.
    retry_pending: bool = False


def observe(track: MetricsTrack, pod: str, now: datetime, sample: TrainerSample | None = None,
            error: str | None = None) -> MetricsTrack:
    """The track after one read of `pod`: a good sample, or an error (which keeps the last good values).

    A pod that follows another is a retry. The trainer reports the checkpoint it resumes from (as its last
    checkpoint step, with that checkpoint's step and epoch) while it loads, so a retry's first reading with one
    says where it went on from; a first training reading without one says it started over.
    """
    if pod != track.pod:
        left_at = track.last_good.step if track.last_good is not None else None
        track = replace(track, pod=pod, resumed_from=None, started_over=False, left_at=left_at,
                        retry_pending=track.pod is not None)
    if sample is None:
        return replace(track, stale_since=track.stale_since or now, error=error or "unreadable")
    resumed, started_over, pending = track.resumed_from, track.started_over, track.retry_pending
    if pending and sample.last_checkpoint_step:
        resumed, pending = sample.last_checkpoint_step, False
    elif pending and sample.phase not in (None, Phase.LOADING):
        started_over, pending = True, False  # training, and no checkpoint said where it went on from
    return replace(track, last_good=sample, last_good_at=now, stale_since=None, error=None, values_pod=pod,
                   resumed_from=resumed, started_over=started_over, retry_pending=pending)


def attempt_note(track: MetricsTrack) -> str | None:
    """One line for `status.message` on how a retry went on, or None for a first attempt."""
    if track.resumed_from:
        went_back = track.left_at is not None and track.left_at > track.resumed_from
        redone = f" (steps {track.resumed_from + 1}-{track.left_at} of the attempt before are trained again)" \
            if went_back else ""
        return f"resumed from the checkpoint of step {track.resumed_from}{redone}"
    if track.started_over:
        return "started over from step 0: no complete checkpoint to resume from"
    return None


def stale_note(track: MetricsTrack) -> str | None:
    """One line for `status.message` while reads fail, or None while they succeed."""
    if track.stale_since is None:
        return None
    if track.last_good is None:
        return f"no trainer metrics read yet ({track.error})"
    return f"Trainer metrics stale since {rfc3339(track.stale_since)} ({track.error}); last values kept"


def with_note(message: str | None, note: str | None) -> str | None:
    """`message` with the staleness note after it (the operator's own message comes first)."""
    if not note:
        return message
    return f"{message}; {note}" if message else note


def metrics_status(track: MetricsTrack, now: datetime, output_path: str | None) -> dict[str, Any]:
    """Status fields from the last good reading (empty before the first one)."""
    if track.last_good is None:
        return {}
    # The completion estimate is anchored at the time of the reading, not at `now`, so that stale
    # values do not drift forward with the clock.
    return status_fields(track.last_good, track.last_good_at or now, output_path)


def _comparable(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "estimatedCompletionTime"}


def changed(old: Mapping[str, Any], new: Mapping[str, Any],
            tolerance: timedelta = COMPLETION_TIME_TOLERANCE) -> bool:
    """Whether `new` says something `old` does not: any field but the completion estimate, which counts
    only when it moved by at least `tolerance`."""
    if _comparable(old) != _comparable(new):
        return True
    before, after = old.get("estimatedCompletionTime"), new.get("estimatedCompletionTime")
    if before == after:
        return False
    a, b = parse_rfc3339(before), parse_rfc3339(after)
    if a is None or b is None:
        return True
    return abs(b - a) >= tolerance


def should_patch(old: Mapping[str, Any], new: Mapping[str, Any], last_patch_time: datetime | None,
                 now: datetime, min_interval: float) -> bool:
    """Whether to patch status now: only when a value changed, and not sooner than `min_interval` seconds
    after the last patch."""
    if not changed(old, new):
        return False
    return last_patch_time is None or (now - last_patch_time).total_seconds() >= min_interval


# ---------------------------------------------------------------------------- the termination summary

def read_termination_summary(message: str | None) -> dict[str, Any] | None:
    """The trainer's JSON exit summary from a container's termination message, or None when it is not
    one (a crash before the trainer ran leaves log lines there instead)."""
    if not message:
        return None
    try:
        document = json.loads(message)
    except ValueError:
        # FallbackToLogsOnError may put log lines before a summary printed last; take the last JSON line.
        for line in reversed(message.strip().splitlines()):
            try:
                document = json.loads(line)
                break
            except ValueError:
                continue
        else:
            return None
    return document if isinstance(document, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def final_fields(summary: Mapping[str, Any], output_path: str | None = None) -> dict[str, Any]:
    """Final status values from the trainer's termination summary (keys of qlora_trainer.output): step,
    progress, epoch, loss, eval loss, throughput, peak memory, last checkpoint. They win over the last
    reading, which may have missed the last steps. A run that succeeded has no ETA left: `eta` and
    `estimatedCompletionTime` come back as None, which a merge patch deletes.
    """
    out: dict[str, Any] = {}
    step, total = _number(summary.get("step")), _number(summary.get("totalSteps"))
    if step is not None:
        out["step"] = int(step)
        if total:
            out["totalSteps"] = int(total)
            out["progress"] = format_progress(int(step), int(total))
    epoch = _number(summary.get("epoch"))
    if epoch is not None:
        out["epoch"] = round(epoch, 2)
    for key in ("loss", "evalLoss"):
        value = _number(summary.get(key))
        if value:
            out[key] = _significant(value)
    speed = _number(summary.get("tokensPerSecond"))
    if speed is not None:
        out["tokensPerSecond"] = round(speed, 1)
    peak = _number(summary.get("gpuMemoryPeakBytes"))
    if peak:
        out["gpuMemoryPeakBytes"] = int(peak)
    checkpoint = summary.get("lastCheckpoint")
    checkpoint_step = _number(checkpoint.get("step")) if isinstance(checkpoint, Mapping) else None
    if checkpoint_step:
        out["lastCheckpoint"] = {"step": int(checkpoint_step)}
        if output_path:
            out["lastCheckpoint"]["path"] = checkpoint_path(output_path, int(checkpoint_step))
    if summary.get("status") == "Succeeded":
        out["eta"] = None
        out["estimatedCompletionTime"] = None
    return out


def final_failure(summary: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a failed run's summary, or None when the summary reports no failure."""
    reason = summary.get("reason")
    if not isinstance(reason, str) or not re.fullmatch(r"[A-Z][A-Za-z0-9]*", reason):
        return None
    message = summary.get("message") or reason
    return reason, _one_line(message, limit=1000)
