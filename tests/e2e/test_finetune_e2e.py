"""A QLoRAFinetune applied with kubectl runs the real trainer (tiny random-weight model, bilingual QA set,
bitsandbytes 4-bit on the CPU) through the operator to the end, and its status tells the story as it happens:
progress and a falling loss while running, the final values of summary.json at the end, the trainer's own
failure reason for bad data, a crash retried from its checkpoint, and stale metrics that leave the phase alone.

Statuses are sampled from the API server by a watch (StatusRecorder), never from the operator's memory.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from tests.e2e.conftest import (
    RUN_TIMEOUT,
    StatusRecorder,
    apply,
    condition,
    finetune,
    operator_process,
    signal_trainer,
)
from tests.prometheus_server import KubernetesPodsSD, PrometheusServer, kubernetes_pods_job, prometheus_binary

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


def assert_matches_summary(status: dict, summary: dict, claim_path: str) -> None:
    assert status["step"] == summary["step"] == summary["totalSteps"] == status["totalSteps"]
    assert status["progress"] == "100%"
    assert status["loss"] == pytest.approx(summary["loss"], rel=1e-3)
    assert status["evalLoss"] == pytest.approx(summary["evalLoss"], rel=1e-3)
    assert status["epoch"] == pytest.approx(summary["epoch"], abs=0.01)
    assert status["lastCheckpoint"]["step"] == summary["lastCheckpoint"]["step"]
    assert status["outputPath"] == f"pvc://adapters/{claim_path}"
    assert "eta" not in status and "estimatedCompletionTime" not in status


def test_a_run_shows_progress_and_falling_loss_then_succeeds(cluster, namespace, demo_inputs, crd):
    resource = finetune("bot")
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "bot") as rec:
        apply(cluster, namespace, resource)
        waiter = subprocess.Popen(
            [cluster.bin("kubectl"), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "wait",
             "--for=condition=Succeeded", f"--timeout={RUN_TIMEOUT}s", "qft/bot"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            rec.wait_for(lambda s: s.get("phase") == "Running" and 0 < (s.get("step") or 0) < 60
                         and s.get("loss") is not None, RUN_TIMEOUT, "a running status with a step and a loss")
            table = cluster.kubectl("get", "qft", "bot", namespace=namespace).stdout
            final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")
            out, _ = waiter.communicate(timeout=60)
        finally:
            if waiter.poll() is None:
                waiter.kill()
        samples = rec.all()

    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert waiter.returncode == 0, out
    assert "condition met" in out
    # What `kubectl get qft -w` shows: forward only, Pending to Running to Succeeded.
    phases = [s["phase"] for s in samples if s.get("phase")]
    assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]] in (
        ["Pending", "Running", "Succeeded"], ["Running", "Succeeded"]), phases

    # While running: intermediate progress, an ETA, the trainer's phase as the Running reason, a falling loss.
    running = [s for s in samples if s.get("phase") == "Running" and s.get("step") is not None]
    steps = sorted({s["step"] for s in running})
    assert any(0 < step < 60 for step in steps), steps
    assert any(re.fullmatch(r"\d+%", s.get("progress", "")) and s["progress"] not in ("0%", "100%")
               for s in running)
    assert any(re.fullmatch(r"(\d+h)?(\d+m)?\d+s", s.get("eta", "")) for s in running)
    assert any(s.get("estimatedCompletionTime") for s in running)
    assert {condition(s, "Running").get("reason") for s in running} & {"Training", "Evaluating", "Saving"}
    losses = [s["loss"] for s in running if s.get("loss") is not None]
    assert len(set(losses)) >= 2, losses
    assert losses[-1] < losses[0], losses
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "PROGRESS", "LOSS", "EPOCH", "ETA"], table
    assert re.search(r"\d+%", table.splitlines()[1]), table

    # At the end: the status says what summary.json says, and the adapter is there.
    folder = demo_inputs.output(resource)
    summary = json.loads((folder / "summary.json").read_text())
    assert_matches_summary(final, summary, "bot")
    assert (folder / "adapter_model.safetensors").is_file()
    assert summary["evalLoss"] < summary["initialEvalLoss"]
    assert final["attempts"] == 1
    assert condition(final, "Succeeded")["status"] == "True"
    assert "hf_" not in json.dumps(samples)


def test_bad_data_fails_with_the_trainers_reason_and_the_line(cluster, namespace, demo_inputs, crd):
    resource = finetune("bad", dataset="demo-qa-bad")
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "bad") as rec:
        apply(cluster, namespace, resource)
        final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")
    assert final["phase"] == "Failed", json.dumps(final, indent=1)
    failed = condition(final, "Succeeded")
    assert failed["status"] == "False" and failed["reason"] == "DatasetInvalid", failed
    assert re.search(r"\bline 3\b", failed["message"]), failed["message"]
    assert "answer" in failed["message"], failed["message"]
    assert final["attempts"] == 1  # a bad data set is not retried
    events = cluster.kubectl("get", "events", "--field-selector", "involvedObject.name=bad",
                             namespace=namespace).stdout
    assert "DatasetInvalid" in events


def test_a_hung_then_killed_pod_goes_stale_then_resumes_from_its_checkpoint(cluster, namespace, demo_inputs, crd):
    resource = finetune("crash", checkpointEvery=5, evalEvery=20)
    resource["spec"]["runtime"] = {"backoffLimit": 2}
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "crash") as rec:
        apply(cluster, namespace, resource)
        # Early enough that the retry has steps left to be seen resuming (reads come every second).
        before = rec.wait_for(lambda s: s.get("phase") == "Running" and (s.get("lastCheckpoint") or {}).get("step")
                              and s.get("step", 0) < 25, RUN_TIMEOUT, "a checkpoint while running")
        pods = cluster.kubectl_json("get", "pods", "-l", "qlora.io/finetune=crash", namespace=namespace)["items"]
        ip = next(p for p in pods if p["status"].get("phase") == "Running")["status"]["podIP"]

        # The trainer hangs (SIGSTOP): its /metrics stops answering; the run stays Running, values are kept.
        pid = signal_trainer(ip, signal.SIGSTOP)
        try:
            stale = rec.wait_for(lambda s: "Trainer metrics stale since" in (s.get("message") or ""), RUN_TIMEOUT,
                                 "the status to say the metrics are stale", after=rec.last())
        finally:
            signal_trainer(ip, signal.SIGCONT)
        fresh = rec.wait_for(lambda s: "stale" not in (s.get("message") or "") and s.get("step", 0) > stale["step"],
                             RUN_TIMEOUT, "fresh values once the trainer answers again", after=stale)
        hung = rec.all()
        hung = hung[hung.index(stale):hung.index(fresh)]

        # Then it crashes (SIGKILL): the Job retries, and the new pod resumes from the last checkpoint.
        assert signal_trainer(ip, signal.SIGKILL) == pid
        retried = rec.wait_for(lambda s: s.get("attempts") == 2 and s.get("phase") == "Running"
                               and "resumed from the checkpoint of step" in (s.get("message") or ""),
                               RUN_TIMEOUT, "the second attempt to resume", after=fresh)
        final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")
        samples = rec.all()

    assert {s["phase"] for s in hung} == {"Running"}
    assert {s["step"] for s in hung} == {stale["step"]}
    assert re.search(r"stale since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(no answer within", stale["message"])

    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert final["attempts"] == 2
    resumed_from = int(re.search(r"resumed from the checkpoint of step (\d+)", retried["message"]).group(1))
    assert resumed_from >= before["lastCheckpoint"]["step"]
    # From the retry's first reading on, the step never went back below the checkpoint it resumed from.
    second = samples[samples.index(retried):]
    assert min(s["step"] for s in second if s.get("step") is not None) >= resumed_from
    pods = cluster.kubectl_json("get", "pods", "-l", "qlora.io/finetune=crash", namespace=namespace)["items"]
    exits = sorted(p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods)
    assert exits == [0, 137], exits
    summary = json.loads((demo_inputs.output(resource) / "summary.json").read_text())
    assert_matches_summary(final, summary, "crash")


@pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not installed (apt-get install prometheus)")
def test_prometheus_mode_and_metrics_that_go_away(cluster, namespace, demo_inputs, crd, tmp_path):
    resource = finetune("prom")
    sd = KubernetesPodsSD(cluster.kubeconfig, [namespace])
    prom = PrometheusServer(tmp_path / "prometheus", [kubernetes_pods_job(sd.url)]).start()
    try:
        with operator_process(cluster, namespace, prometheus_url=prom.url) as op, \
                StatusRecorder(cluster, namespace, "prom") as rec:
            apply(cluster, namespace, resource)
            live = rec.wait_for(lambda s: s.get("phase") == "Running" and (s.get("step") or 0) >= 2
                                and s.get("loss") is not None, RUN_TIMEOUT, "progress read through Prometheus")
            assert prom.query('qlora_trainer_step{namespace="%s"}' % namespace), "Prometheus scraped no trainer"
            assert f"reading trainer metrics from Prometheus at {prom.url}" in op.log()

            # The metrics source goes away mid-run: values stay, the phase stays, the message says since when.
            before_stop = rec.last()
            prom.stop()
            stale = rec.wait_for(lambda s: "stale since" in (s.get("message") or ""), RUN_TIMEOUT,
                                 "the status to say the metrics are stale", after=before_stop)
            final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")
            samples = rec.all()
    finally:
        prom.stop()
        sd.close()

    assert stale["phase"] == "Running"
    assert re.search(r"Trainer metrics stale since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(.+\); last values kept",
                     stale["message"]), stale["message"]
    assert stale["step"] >= live["step"] and stale["loss"] is not None
    # From the first stale status until the trainer ended, neither the phase nor the values moved.
    after = samples[samples.index(stale):samples.index(final)]
    ended = next((i for i, s in enumerate(after) if s.get("step") == final["step"]), len(after))
    frozen = after[:ended]
    assert frozen and {s["phase"] for s in frozen} == {"Running"}
    assert {(s.get("step"), s.get("loss")) for s in frozen} == {(stale["step"], stale["loss"])}
    assert "Failed" not in {s["phase"] for s in after}
    # The final values come from the termination summary, though no read saw them.
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    summary = json.loads((demo_inputs.output(resource) / "summary.json").read_text())
    assert_matches_summary(final, summary, "prom")
    assert "stale" not in final["message"]
