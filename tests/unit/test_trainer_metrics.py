"""Reading the trainer's metrics and mapping them onto status: parsing real exposition text, garbled text,
Prometheus query answers, formatting, staleness, the patch decision and the termination summary."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, generate_latest

from qlora_operator import trainer_metrics as tm
from qlora_trainer.contract import Metric, Phase

NOW = datetime(2026, 11, 27, 22, 0, 0, tzinfo=timezone.utc)


def trainer_registry(values: dict[Metric, float], phase: Phase | None = Phase.TRAINING) -> CollectorRegistry:
    """A registry with the trainer's metric types: gauges, a `tokens_total` counter and a `phase` state set."""
    registry = CollectorRegistry()
    for metric in Metric:
        if metric is Metric.PHASE:
            states = Enum(metric.full, "phase", states=[p.value for p in Phase], registry=registry)
            if phase is not None:
                states.state(phase.value)
        elif metric is Metric.TOKENS_TOTAL:
            counter = Counter(metric.full, "tokens", registry=registry)
            if metric in values:
                counter.inc(values[metric])
        elif metric in values:
            Gauge(metric.full, metric.value, registry=registry).set(values[metric])
    return registry


FULL = {
    Metric.STEP: 42,
    Metric.TOTAL_STEPS: 100,
    Metric.EPOCH: 1.2666,
    Metric.LOSS: 1.234567,
    Metric.EVAL_LOSS: 1.5,
    Metric.LEARNING_RATE: 4.5e-5,
    Metric.GRAD_NORM: 0.25,
    Metric.TOKENS_PER_SECOND: 4960.44,
    Metric.TOKENS_TOTAL: 123456,
    Metric.GPU_MEMORY_PEAK_BYTES: 6_335_000_000,
    Metric.ETA_SECONDS: 192,
    Metric.LAST_CHECKPOINT_STEP: 40,
    Metric.START_TIME_SECONDS: 1_795_000_000.5,
}


def exposition(values=FULL, phase: Phase | None = Phase.TRAINING) -> str:
    return generate_latest(trainer_registry(values, phase)).decode()


def test_parse_real_exposition_reads_every_metric():
    sample = tm.parse_exposition(exposition())
    assert sample == tm.TrainerSample(
        step=42, total_steps=100, epoch=1.2666, loss=1.234567, eval_loss=1.5, learning_rate=4.5e-5,
        grad_norm=0.25, tokens_per_second=4960.44, tokens_total=123456, gpu_memory_peak_bytes=6_335_000_000,
        eta_seconds=192.0, last_checkpoint_step=40, start_time_seconds=1_795_000_000.5, phase=Phase.TRAINING,
    )


@pytest.mark.parametrize("phase", list(Phase))
def test_phase_state_set(phase):
    assert tm.parse_exposition(exposition({Metric.STEP: 1}, phase)).phase is phase


def test_phase_as_a_plain_label_is_read_too():
    text = 'qlora_trainer_phase{phase="loading"} 0\nqlora_trainer_phase{phase="saving"} 1\n'
    assert tm.parse_exposition(text).phase is Phase.SAVING


def test_partial_exposition_leaves_unknown_fields_none():
    sample = tm.parse_exposition(exposition({Metric.STEP: 0, Metric.TOTAL_STEPS: 20}, Phase.LOADING))
    assert (sample.step, sample.total_steps, sample.phase) == (0, 20, Phase.LOADING)
    assert sample.loss is None and sample.eval_loss is None and sample.eta_seconds is None


def test_nan_and_negative_values_mean_not_known_yet():
    text = "qlora_trainer_loss NaN\nqlora_trainer_eta_seconds -1\nqlora_trainer_step 3\nqlora_trainer_grad_norm +Inf\n"
    sample = tm.parse_exposition(text)
    assert sample.step == 3
    assert sample.loss is None and sample.eta_seconds is None and sample.grad_norm is None


def test_other_series_are_ignored():
    text = "python_gc_objects_collected_total{generation=\"0\"} 5\nqlora_trainer_step 7\nqlora_trainer_new_thing 1\n"
    assert tm.parse_exposition(text) == tm.TrainerSample(step=7)


@pytest.mark.parametrize("text", [
    "qlora_trainer_step abc\n",
    "qlora_trainer_step 1\nqlora_trainer_lo",
    "<html><body>502 Bad Gateway</body></html>",
    'qlora_trainer_step{a="b 1\n',
    exposition()[: len(exposition()) // 2] + '{"x',
])
def test_garbled_text_is_unreadable(text):
    with pytest.raises(tm.MetricsUnreadable, match="garbled"):
        tm.parse_exposition(text)


@pytest.mark.parametrize("text", ["", "# just a comment\n", "process_cpu_seconds_total 3\n"])
def test_no_trainer_series_is_unreadable(text):
    with pytest.raises(tm.MetricsUnreadable, match="no qlora_trainer_"):
        tm.parse_exposition(text)


def query_answer(text: str, labels: dict[str, str]) -> dict:
    """What Prometheus answers to the selector after scraping `text` from a target with `labels`."""
    result = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        sample = next(iter(tm.text_string_to_metric_families(line))).samples[0]
        result.append({"metric": {"__name__": sample.name, **sample.labels, **labels},
                       "value": [1795816545.1, repr(sample.value)]})
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def test_prometheus_answer_reads_like_the_pod():
    labels = {"namespace": "ml", "pod": "support-bot-0-abcde", "job": "ml/qlora", "instance": "10.1.2.3:9090"}
    assert tm.parse_query_response(query_answer(exposition(), labels)) == tm.parse_exposition(exposition())


@pytest.mark.parametrize("document, match", [
    ({"status": "success", "data": {"resultType": "vector", "result": []}}, "no trainer series"),
    ({"status": "error", "errorType": "bad_data", "error": "parse error"}, "query failed: parse error"),
    ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "not a vector"),
    ({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}}]}}, "unexpected shape"),
])
def test_bad_prometheus_answers(document, match):
    with pytest.raises(tm.MetricsUnreadable, match=match):
        tm.parse_query_response(document)


def test_selector_matches_podmonitor_labels_and_escapes():
    assert tm.promql_selector("ml", "run-0-x") == '{__name__=~"qlora_trainer_.*", namespace="ml", pod="run-0-x"}'
    assert tm.promql_selector('a"b', "p", "kubernetes_namespace", "kubernetes_pod_name") == (
        '{__name__=~"qlora_trainer_.*", kubernetes_namespace="a\\"b", kubernetes_pod_name="p"}')


@pytest.mark.parametrize("url, shown", [
    ("http://prom:9090", "http://prom:9090"),
    ("https://user:s3cret@prom.example:443/base", "https://***@prom.example:443/base"),
    ("http://token@prom:9090/", "http://***@prom:9090/"),
])
def test_redact_url(url, shown):
    assert tm.redact_url(url) == shown


def test_metrics_url():
    assert tm.metrics_url("127.3.0.5") == "http://127.3.0.5:9090/metrics"
    assert tm.metrics_url("fd00::5", 9100) == "http://[fd00::5]:9100/metrics"


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (45.4, "45s"), (59.6, "1m0s"), (192, "3m12s"), (3600, "1h0m0s"), (7505, "2h5m5s"), (-3, "0s"),
])
def test_format_duration(seconds, text):
    assert tm.format_duration(seconds) == text


@pytest.mark.parametrize("step, total, text", [
    (0, 20, "0%"), (42, 100, "42%"), (19, 20, "95%"), (199, 200, "99%"), (20, 20, "100%"), (25, 20, "100%"),
    (3, 0, "0%"),
])
def test_format_progress(step, total, text):
    assert tm.format_progress(step, total) == text


def test_status_fields_of_a_full_reading():
    fields = tm.status_fields(tm.parse_exposition(exposition()), NOW, "pvc://adapters/support-bot")
    assert fields == {
        "progress": "42%",
        "step": 42,
        "totalSteps": 100,
        "epoch": 1.27,
        "loss": 1.235,
        "evalLoss": 1.5,
        "learningRate": 4.5e-05,
        "gradNorm": 0.25,
        "tokensPerSecond": 4960.4,
        "gpuMemoryPeakBytes": 6_335_000_000,
        "eta": "3m12s",
        "estimatedCompletionTime": "2026-11-27T22:03:12Z",
        "lastCheckpoint": {"step": 40, "path": "pvc://adapters/support-bot/checkpoints/checkpoint-40"},
    }
    assert set(fields) <= set(tm.METRIC_FIELDS)


def test_status_fields_leave_out_what_is_not_known():
    sample = tm.TrainerSample(step=0, total_steps=20, phase=Phase.TRAINING, gpu_memory_peak_bytes=0,
                              last_checkpoint_step=0)
    assert tm.status_fields(sample, NOW, None) == {"step": 0, "totalSteps": 20, "progress": "0%"}


def test_gauges_still_at_zero_before_the_first_step_are_not_values():
    # What the trainer serves between loading and its first step: every gauge at its initial 0.
    zeros = {m: 0 for m in Metric if m not in (Metric.PHASE, Metric.TOTAL_STEPS)} | {Metric.TOTAL_STEPS: 20}
    assert tm.status_fields(tm.parse_exposition(exposition(zeros)), NOW, None) == {
        "step": 0, "totalSteps": 20, "progress": "0%", "epoch": 0.0}
    # After a step, a loss is real but an evaluation loss still at 0 is not one yet.
    fields = tm.status_fields(tm.TrainerSample(step=1, total_steps=20, loss=2.5, eval_loss=0.0,
                                               learning_rate=0.0, grad_norm=0.0), NOW, None)
    assert fields["loss"] == 2.5 and "evalLoss" not in fields
    assert fields["learningRate"] == 0.0 and fields["gradNorm"] == 0.0


def test_nothing_is_shown_while_loading():
    # A retried pod loads with step 0; the previous attempt's values stay until it has resumed.
    sample = tm.TrainerSample(step=0, total_steps=0, loss=0.0, last_checkpoint_step=0, phase=Phase.LOADING)
    assert tm.status_fields(sample, NOW, "out") == {}
    assert tm.running_reason(sample) == "Loading"


def test_a_resumed_position_is_shown_while_loading():
    # A retry says, while it loads, which checkpoint it goes on from: that is where the run stands.
    sample = tm.TrainerSample(step=25, total_steps=40, epoch=1.25, last_checkpoint_step=25, eta_seconds=9,
                              phase=Phase.LOADING)
    assert tm.status_fields(sample, NOW, "out") == {
        "step": 25, "totalSteps": 40, "progress": "62%", "epoch": 1.25,
        "lastCheckpoint": {"step": 25, "path": "out/checkpoints/checkpoint-25"},
        "eta": None, "estimatedCompletionTime": None}


def test_no_eta_once_the_trainer_is_done():
    sample = tm.TrainerSample(step=20, total_steps=20, eta_seconds=0, phase=Phase.DONE)
    assert "eta" not in tm.status_fields(sample, NOW, None)


def test_checkpoint_without_output_path_has_only_the_step():
    fields = tm.status_fields(tm.TrainerSample(last_checkpoint_step=10), NOW, None)
    assert fields == {"lastCheckpoint": {"step": 10}}


@pytest.mark.parametrize("phase, reason", [
    (Phase.LOADING, "Loading"), (Phase.TRAINING, "Training"), (Phase.EVALUATING, "Evaluating"),
    (Phase.SAVING, "Saving"), (Phase.DONE, None), (Phase.FAILED, None), (None, None),
])
def test_running_reason(phase, reason):
    assert tm.running_reason(tm.TrainerSample(phase=phase)) == reason


def test_running_reason_without_a_reading():
    assert tm.running_reason(None) is None


def test_unreachable_keeps_the_last_good_values_and_says_since_when():
    good = tm.parse_exposition(exposition())
    track = tm.observe(tm.MetricsTrack(), "pod-a", NOW, sample=good)
    assert tm.stale_note(track) is None
    first = tm.observe(track, "pod-a", NOW + timedelta(seconds=10), error="connection refused")
    later = tm.observe(first, "pod-a", NOW + timedelta(seconds=20), error="no answer within 3s")
    assert later.last_good == good
    assert later.stale_since == NOW + timedelta(seconds=10)
    assert tm.stale_note(later) == (
        "Trainer metrics stale since 2026-11-27T22:00:10Z (no answer within 3s); last values kept")
    # The values (and the completion estimate, anchored at the good read) do not move while stale.
    assert tm.metrics_status(later, NOW + timedelta(minutes=5), "out") == tm.status_fields(good, NOW, "out")
    assert tm.running_reason(later.last_good) == "Training"


def test_a_good_read_after_stale_clears_the_note():
    track = tm.observe(tm.MetricsTrack(), "pod-a", NOW, error="garbled metrics: x")
    assert tm.stale_note(track) == "no trainer metrics read yet (garbled metrics: x)"
    assert tm.metrics_status(track, NOW, None) == {}
    track = tm.observe(track, "pod-a", NOW + timedelta(seconds=10), sample=tm.TrainerSample(step=1))
    assert tm.stale_note(track) is None and track.error is None
    assert tm.metrics_status(track, NOW, None) == {"step": 1}


def test_a_retry_that_resumes_is_recognised():
    first = tm.observe(tm.MetricsTrack(), "pod-a", NOW, sample=tm.TrainerSample(step=12, last_checkpoint_step=10,
                                                                                 phase=Phase.TRAINING))
    assert first.resumed_from is None and not first.retry_pending
    # pod-a crashed; pod-b starts, loads, and reports the checkpoint it resumes from before training.
    loading = tm.observe(first, "pod-b", NOW, error="connection refused")
    loading = tm.observe(loading, "pod-b", NOW, sample=tm.TrainerSample(step=0, phase=Phase.LOADING))
    assert loading.retry_pending and loading.resumed_from is None
    resumed = tm.observe(loading, "pod-b", NOW, sample=tm.TrainerSample(step=0, last_checkpoint_step=10,
                                                                        phase=Phase.LOADING))
    assert resumed.resumed_from == 10 and not resumed.retry_pending
    # Later checkpoints do not change where it resumed from; a further pod starts over.
    later = tm.observe(resumed, "pod-b", NOW, sample=tm.TrainerSample(step=15, last_checkpoint_step=15))
    assert later.resumed_from == 10
    assert tm.observe(later, "pod-c", NOW, error="x").resumed_from is None


def test_a_retry_that_started_over_is_not_called_resumed():
    first = tm.observe(tm.MetricsTrack(), "pod-a", NOW, sample=tm.TrainerSample(step=12, phase=Phase.TRAINING))
    again = tm.observe(first, "pod-b", NOW, sample=tm.TrainerSample(step=1, phase=Phase.TRAINING))
    assert again.resumed_from is None and not again.retry_pending
    # ... even when it saves a checkpoint later.
    assert tm.observe(again, "pod-b", NOW, sample=tm.TrainerSample(step=5, last_checkpoint_step=5)).resumed_from is None
    # The first pod the operator sees (say after its own restart) is no retry.
    fresh = tm.observe(tm.MetricsTrack(), "pod-a", NOW, sample=tm.TrainerSample(step=12, last_checkpoint_step=10))
    assert fresh.resumed_from is None


def test_with_note():
    assert tm.with_note("Training on localnode", None) == "Training on localnode"
    assert tm.with_note("Training on localnode", "stale") == "Training on localnode; stale"
    assert tm.with_note(None, "stale") == "stale"
    assert tm.with_note("", "stale") == "stale"


def test_should_patch_only_on_change():
    fields = {"step": 5, "loss": 2.0}
    assert not tm.should_patch(fields, dict(fields), None, NOW, 5)
    assert tm.should_patch(fields, {"step": 6, "loss": 2.0}, None, NOW, 5)
    assert tm.should_patch({}, fields, None, NOW, 5)


def test_should_patch_respects_the_min_interval():
    old, new = {"step": 5}, {"step": 6}
    assert not tm.should_patch(old, new, NOW - timedelta(seconds=4.9), NOW, 5)
    assert tm.should_patch(old, new, NOW - timedelta(seconds=5), NOW, 5)
    assert tm.should_patch(old, new, NOW - timedelta(hours=1), NOW, 5)


def test_completion_time_jitter_is_no_change():
    old = {"step": 5, "estimatedCompletionTime": "2026-11-27T22:03:12Z"}
    assert not tm.should_patch(old, {**old, "estimatedCompletionTime": "2026-11-27T22:03:40Z"}, None, NOW, 0)
    assert tm.should_patch(old, {**old, "estimatedCompletionTime": "2026-11-27T22:04:12Z"}, None, NOW, 0)
    assert tm.should_patch(old, {"step": 5}, None, NOW, 0)


# What qlora_trainer.output writes: run_summary() on success, failure_summary() otherwise.
SUCCESS_SUMMARY = {
    "status": "Succeeded", "exitCode": 0, "step": 20, "totalSteps": 20, "epoch": 2.5, "loss": 0.41234,
    "evalLoss": 0.5, "initialEvalLoss": 5.1, "tokensTotal": 9000, "truncated": 0,
    "lastCheckpoint": {"step": 20, "path": "/output/support-bot/checkpoints/checkpoint-20"},
    "outputPath": "/output/support-bot", "durationSeconds": 12.5, "gpuMemoryPeakBytes": 0,
    "tokensPerSecond": 812.345, "versions": {"torch": "2.13.0"},
}


def test_final_fields_from_a_summary():
    assert tm.final_fields(SUCCESS_SUMMARY, "/output/support-bot") == {
        "step": 20, "totalSteps": 20, "progress": "100%", "epoch": 2.5, "loss": 0.4123, "evalLoss": 0.5,
        "tokensPerSecond": 812.3,
        "lastCheckpoint": {"step": 20, "path": "/output/support-bot/checkpoints/checkpoint-20"},
        "eta": None, "estimatedCompletionTime": None,
    }


def test_final_fields_of_a_stopped_run_keep_the_eta_and_skip_what_is_missing():
    summary = {"status": "Terminated", "reason": None, "exitCode": 143, "message": "stopped by SIGTERM",
               "step": 12, "totalSteps": 40, "loss": 1.5, "lastCheckpoint": {"step": 12}, "gpuMemoryPeakBytes": 0}
    assert tm.final_fields(summary) == {"step": 12, "totalSteps": 40, "progress": "30%", "loss": 1.5,
                                        "lastCheckpoint": {"step": 12}}
    assert tm.final_failure(summary) is None


def test_final_fields_ignore_odd_values():
    summary = {"step": True, "loss": "low", "evalLoss": float("nan"), "epoch": None, "lastCheckpoint": 5}
    assert tm.final_fields(summary) == {}


def test_failed_summary_gives_reason_and_message():
    summary = {"status": "Failed", "reason": "DatasetInvalid", "exitCode": 65,
               "message": "data.jsonl line 3: field `answer` is missing", "gpuMemoryPeakBytes": 0}
    assert tm.final_failure(summary) == ("DatasetInvalid", "data.jsonl line 3: field `answer` is missing")
    assert tm.final_fields(summary) == {}
    assert tm.final_failure(SUCCESS_SUMMARY) is None


@pytest.mark.parametrize("message, expected", [
    (json.dumps(SUCCESS_SUMMARY), SUCCESS_SUMMARY),
    ("Traceback ...\nValueError: x\n" + json.dumps({"reason": "TrainingFailed"}), {"reason": "TrainingFailed"}),
    ("Killed", None), ("", None), (None, None), ("[1, 2]", None),
])
def test_read_termination_summary(message, expected):
    assert tm.read_termination_summary(message) == expected


# ---------------------------------------------------------------------------------- reading over HTTP

class _Server:
    """A loopback HTTP server answering every GET with (status, body) from `answer`."""

    def __init__(self, answer):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                status, body = outer.answer
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.answer = answer
        self.paths: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def start(answer):
        servers.append(_Server(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def read(reader: tm.MetricsReader, *args):
    async def go():
        try:
            return await reader.read(*args)
        finally:
            await reader.close()

    return asyncio.run(go())


def test_reader_scrapes_the_pod(server):
    s = server((200, exposition()))
    sample = read(tm.MetricsReader(port=s.port), "ml", "pod-a", "127.0.0.1")
    assert sample.step == 42 and sample.phase is Phase.TRAINING
    assert s.paths == ["/metrics"]


def test_reader_queries_prometheus(server):
    answer = query_answer(exposition(), {"namespace": "ml", "pod": "pod-a"})
    s = server((200, json.dumps(answer)))
    sample = read(tm.MetricsReader(prometheus_url=f"http://127.0.0.1:{s.port}/"), "ml", "pod-a", None)
    assert sample.loss == 1.234567
    from urllib.parse import parse_qs, urlparse

    url = urlparse(s.paths[0])
    assert url.path == "/api/v1/query"
    assert parse_qs(url.query)["query"] == [tm.promql_selector("ml", "pod-a")]


@pytest.mark.parametrize("answer, match", [
    ((500, "oops"), "HTTP 500"),
    ((200, "qlora_trainer_step x"), "garbled"),
    ((200, "qlora_trainer_step 1\n" + "# padding\n" * (tm.MAX_RESPONSE_BYTES // 10)), "larger than"),
])
def test_reader_errors_are_short_lines(server, answer, match):
    s = server(answer)
    with pytest.raises(tm.MetricsUnreadable, match=match):
        read(tm.MetricsReader(port=s.port), "ml", "pod-a", "127.0.0.1")


def test_reader_connection_refused_and_no_ip():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(tm.MetricsUnreadable) as err:
            read(tm.MetricsReader(port=port), "ml", "pod-a", "127.0.0.1")
    assert "\n" not in str(err.value) and str(err.value)
    with pytest.raises(tm.MetricsUnreadable, match="no IP"):
        read(tm.MetricsReader(), "ml", "pod-a", None)


def test_reader_times_out(server):
    # A listening socket that never answers.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        with pytest.raises(tm.MetricsUnreadable, match="no answer within 0.3s"):
            read(tm.MetricsReader(port=sock.getsockname()[1], timeout=0.3), "ml", "pod-a", "127.0.0.1")


def test_reader_bounds_concurrency(server):
    s = server((200, exposition()))
    reader = tm.MetricsReader(port=s.port, concurrency=2)
    peak = 0

    async def go():
        original = reader._scrape
        active = 0

        async def counting(ip):
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            try:
                return await original(ip)
            finally:
                active -= 1

        reader._scrape = counting
        try:
            return await asyncio.gather(*(reader.read("ml", f"p{i}", "127.0.0.1") for i in range(10)))
        finally:
            await reader.close()

    samples = asyncio.run(go())
    assert len(samples) == 10 and all(x.step == 42 for x in samples)
    assert peak == 2
