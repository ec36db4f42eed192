"""Faults of the trainer's pod, on the real node (docs/reliability.md): a pod deleted or evicted mid-run, a memory
limit the kernel enforces, and a checkpoint on the volume that a crash cut short. Each test asserts what a user
sees (phase, conditions, message) and what the output volume keeps."""

from __future__ import annotations

import json
import re
import signal

import pytest

from qlora_trainer.checkpoints import checkpoint_problem
from tests.e2e.conftest import (
    RUN_TIMEOUT, StatusRecorder, apply, condition, finetune, operator_process, signal_trainer,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.cluster]


def pods_of(cluster, namespace: str, name: str) -> list[dict]:
    pods = cluster.kubectl_json("get", "pods", "-l", f"qlora.io/finetune={name}", namespace=namespace)["items"]
    return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])


def running_pod(cluster, namespace: str, name: str) -> dict:
    (pod,) = [p for p in pods_of(cluster, namespace, name)
              if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    return pod


def resumed_from(status: dict) -> int | None:
    found = re.search(r"resumed from the checkpoint of step (\d+)", status.get("message") or "")
    return int(found.group(1)) if found else None


def test_a_pod_deleted_then_one_evicted_resume_from_their_sigterm_checkpoints_and_count_as_no_failure(
        cluster, namespace, demo_inputs, crd):
    # Long enough that each pod is still training when the next fault comes (a step takes about 0.1 s here).
    resource = finetune("moved", checkpointEvery=5000, evalEvery=5000, maxSteps=1500, batchSize=2,
                        gradientAccumulationSteps=1)
    resource["spec"]["runtime"] = {"backoffLimit": 0}  # a counted failure would fail the run
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "moved") as rec:
        apply(cluster, namespace, resource)
        rec.wait_for(lambda s: s.get("phase") == "Running" and 3 <= s.get("step", 0) < 500, RUN_TIMEOUT,
                     "the first pod training")
        # `kubectl delete pod`: no DisruptionTarget condition; the trainer checkpoints on the SIGTERM, exits 143.
        first = running_pod(cluster, namespace, "moved")
        cluster.kubectl("delete", "pod", first["metadata"]["name"], "--wait=false", namespace=namespace)
        deleted = rec.wait_for(lambda s: condition(s, "Succeeded").get("reason") == "Interrupted", RUN_TIMEOUT,
                               "the run to say its pod was taken away", after=rec.last())
        second = rec.wait_for(lambda s: s.get("phase") == "Running" and resumed_from(s), RUN_TIMEOUT,
                              "the second pod to resume", after=deleted)
        # Once the second pod trains (a SIGTERM while it still loads would stop it with nothing new to save):
        # the Eviction API (a node drain), the DisruptionTarget condition.
        rec.wait_for(lambda s: s.get("phase") == "Running" and s.get("step", 0) > resumed_from(second) + 5,
                     RUN_TIMEOUT, "the second pod training", after=second)
        pod = running_pod(cluster, namespace, "moved")
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                    "metadata": {"name": pod["metadata"]["name"], "namespace": namespace}}
        cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/eviction",
                        "-f", "-", input=json.dumps(eviction))
        evicted = rec.wait_for(lambda s: "evicted" in (s.get("message") or ""), RUN_TIMEOUT,
                               "the run to say its pod was evicted", after=second)
        third = rec.wait_for(lambda s: s.get("phase") == "Running" and (resumed_from(s) or 0) > resumed_from(second),
                             RUN_TIMEOUT, "the third pod to resume", after=evicted)
        final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")

    assert deleted["phase"] == "Pending" and condition(deleted, "Succeeded")["status"] == "Unknown"
    assert "stopped by a SIGTERM" in deleted["message"] or "its pod is being deleted" in deleted["message"]
    assert condition(evicted, "Succeeded")["reason"] == "Interrupted"
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert final["attempts"] == 3 and final["step"] == 1500
    # Each pod stopped on its SIGTERM with a checkpoint of the step it was at (checkpointEvery is 5000: no other
    # checkpoint is made before the last step), and the next resumed from it.
    stops = [resumed_from(second), resumed_from(third)]
    assert 0 < stops[0] < stops[1] < 1500
    checkpoints = sorted(p.name for p in (demo_inputs.output(resource) / "checkpoints").iterdir())
    assert checkpoints == sorted(f"checkpoint-{step}" for step in (*stops, 1500))
    # Neither counted against backoffLimit (0): the Job saw no failure.
    (job,) = cluster.kubectl_json("get", "jobs", "-l", "qlora.io/finetune=moved", namespace=namespace)["items"]
    assert not job["status"].get("failed"), job["status"]


def test_a_memory_limit_too_small_is_oomkilled_by_the_kernel_and_fails_with_the_limit_named(
        cluster, namespace, demo_inputs, crd):
    resource = finetune("tight")
    resource["spec"]["resources"] = {"gpus": 0, "memory": "200Mi"}  # torch alone takes more
    resource["spec"]["runtime"] = {"backoffLimit": 1}
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "tight") as rec:
        apply(cluster, namespace, resource)
        final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")
        samples = rec.all()

    assert final["phase"] == "Failed", json.dumps(final, indent=1)
    assert condition(final, "Succeeded")["reason"] == "OOMKilled"
    assert "memory limit (200Mi)" in final["message"] and "raise resources.memory" in final["message"]
    assert "(failed 2 times)" in final["message"]  # backoffLimit 1: two attempts, then it stops
    retrying = [s for s in samples if condition(s, "Running").get("reason") == "Retrying"]
    assert retrying and "OOMKilled" in retrying[0]["message"]
    states = [p["status"]["containerStatuses"][0]["state"]["terminated"] for p in pods_of(cluster, namespace, "tight")]
    assert [(s["reason"], s["exitCode"]) for s in states] == [("OOMKilled", 137)] * 2


def test_a_checkpoint_cut_short_on_the_volume_is_skipped_and_the_retry_resumes_from_the_one_before(
        cluster, namespace, demo_inputs, crd):
    resource = finetune("cut", checkpointEvery=4, evalEvery=1000, maxSteps=120, batchSize=2,
                        gradientAccumulationSteps=1)
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "cut") as rec:
        apply(cluster, namespace, resource)
        rec.wait_for(lambda s: s.get("phase") == "Running" and (s.get("lastCheckpoint") or {}).get("step", 0) >= 8
                     and s.get("step", 0) < 80, RUN_TIMEOUT, "two checkpoints while running")
        pod = running_pod(cluster, namespace, "cut")
        signal_trainer(pod["status"]["podIP"], signal.SIGSTOP)  # no more checkpoints while the volume is cut
        folder = demo_inputs.output(resource) / "checkpoints"
        newest, before = sorted((p for p in folder.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))[-2:][::-1]
        # A node crash before the page cache reached the disk: the state is intact, the optimizer cut short.
        size = (newest / "optimizer.pt").stat().st_size
        with (newest / "optimizer.pt").open("r+b") as f:
            f.truncate(size // 3)
        signal_trainer(pod["status"]["podIP"], signal.SIGKILL)
        retried = rec.wait_for(lambda s: s.get("attempts") == 2 and resumed_from(s), RUN_TIMEOUT, "the retry")
        final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")

    assert resumed_from(retried) == int(before.name.split("-")[1])
    assert final["phase"] == "Succeeded" and final["step"] == 120, json.dumps(final, indent=1)
    retry = pods_of(cluster, namespace, "cut")[-1]["metadata"]["name"]
    log = cluster.kubectl("logs", retry, namespace=namespace).stdout
    assert f"skipping checkpoint {'/output/cut/checkpoints/' + newest.name}: optimizer.pt has {size // 3} bytes of " \
        f"{size}" in log, log[-3000:]
    # What the volume keeps at the end (the last few checkpoints) is whole.
    kept = sorted(folder.glob("checkpoint-*"))
    assert len(kept) == 3 and [checkpoint_problem(p) for p in kept] == [None] * 3
