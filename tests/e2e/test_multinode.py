"""A two-node run on the local cluster (issue 18, item 1): `resources: {nodes: 2, gpus: 0}` is an Indexed Job of
two pods in the trainer image that rendezvous through the run's headless Service (the cluster's DNS, the pod
network; gloo on the CPU) and train one model. Rank 0 alone serves the metrics status reads and writes the
adapter and the summary; the run takes as many optimizer steps as one node with the same global batch.
"""

from __future__ import annotations

import json
import re
import signal

import pytest

from tests.e2e.conftest import (
    RUN_TIMEOUT, StatusRecorder, apply, condition, finetune, operator_process, signal_trainer,
)

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


def one_epoch(name: str, nodes: int, batch: int) -> dict:
    """The demo's run for one epoch (not maxSteps: the step count then follows from the global batch)."""
    resource = finetune(name, batchSize=batch, gradientAccumulationSteps=1, checkpointEvery=1000, evalEvery=1000)
    del resource["spec"]["training"]["maxSteps"]
    resource["spec"]["training"]["epochs"] = 1
    resource["spec"]["resources"] = {"gpus": 0, "nodes": nodes}
    return resource


def test_two_nodes_rendezvous_through_the_headless_service_and_train_one_model(cluster, namespace, demo_inputs, crd):
    two = one_epoch("pair", nodes=2, batch=2)
    one = one_epoch("single", nodes=1, batch=4)  # the same global batch: 2 workers x 2 = 1 x 4
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "pair") as rec, \
            StatusRecorder(cluster, namespace, "single") as single:
        apply(cluster, namespace, two)
        apply(cluster, namespace, one)
        final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the two-node run's end")
        alone = single.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the one-node run")
        samples = rec.all()
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert alone["phase"] == "Succeeded", json.dumps(alone, indent=1)
    assert final["totalSteps"] == alone["totalSteps"] == final["step"] > 1

    # Progress came from rank 0 while both ran.
    running = [s for s in samples if s.get("phase") == "Running" and s.get("step") is not None]
    assert any(0 < s["step"] < final["totalSteps"] for s in running), [s.get("step") for s in running]

    (job,) = cluster.kubectl_json("get", "jobs", "-l", "qlora.io/finetune=pair", namespace=namespace)["items"]
    assert job["spec"]["completionMode"] == "Indexed" and job["status"].get("succeeded") == 2
    pods = cluster.kubectl_json("get", "pods", "-l", "qlora.io/finetune=pair", namespace=namespace)["items"]
    by_rank = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert sorted(by_rank) == ["0", "1"]
    # One process group of two workers (gloo: no GPU): rank 0 saw a world of two, which needs the second pod to
    # have found it by the Service's DNS name (only the main process logs at INFO).
    logs = {rank: cluster.kubectl("logs", pod["metadata"]["name"], namespace=namespace).stdout
            for rank, pod in by_rank.items()}
    assert "data parallel: worker 0 of 2 (gloo)" in logs["0"], logs["0"][-3000:]
    assert "--nnodes=2 --node-rank=1 --master-addr=pair-0.pair " in logs["1"], logs["1"][-3000:]

    folder = demo_inputs.output(two)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["step"] == final["step"]
    assert (folder / "adapter_model.safetensors").is_file()
    # the second pod ended cleanly too (a worker that failed would have failed the group)
    rank1 = by_rank["1"]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert rank1["exitCode"] == 0, rank1


def rank_pods(cluster, namespace: str, name: str) -> dict[str, list[dict]]:
    """The run's pods by rank, oldest first."""
    pods = cluster.kubectl_json("get", "pods", "-l", f"qlora.io/finetune={name}", namespace=namespace)["items"]
    ranks: dict[str, list[dict]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"]):
        ranks.setdefault(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"], []).append(pod)
    return ranks


def test_a_rank_killed_mid_run_restarts_the_group_and_every_rank_resumes_from_one_checkpoint(
        cluster, namespace, demo_inputs, crd):
    resource = finetune("crash2", checkpointEvery=5, evalEvery=1000, maxSteps=120, batchSize=2,
                        gradientAccumulationSteps=1)
    resource["spec"]["resources"] = {"gpus": 0, "nodes": 2}
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "crash2") as rec:
        apply(cluster, namespace, resource)
        before = rec.wait_for(lambda s: s.get("phase") == "Running" and (s.get("lastCheckpoint") or {}).get("step")
                              and s.get("step", 0) < 60, RUN_TIMEOUT, "a checkpoint while both ranks run")
        (victim,) = rank_pods(cluster, namespace, "crash2")["1"]
        # The pod's trainer dies at once, as in a crash of its node: its launcher is the container's first process.
        signal_trainer(victim["status"]["podIP"], signal.SIGKILL)
        final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")
        samples = rec.all()

    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert final["step"] == 120 and final["attempts"] == 4
    # The operator restarted both ranks together (the Job alone would have replaced rank 1 only).
    after = samples[samples.index(before):]
    assert any(condition(s, "Running").get("reason") == "Regrouping" for s in after), \
        [(s.get("phase"), s.get("message")) for s in after]
    pods = rank_pods(cluster, namespace, "crash2")
    killed = pods["1"][0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert killed["exitCode"] == 137, killed
    retry = {rank: ps[-1] for rank, ps in pods.items()}
    for rank, pod in retry.items():
        ended = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert ended["startedAt"] >= killed["finishedAt"] and ended["exitCode"] == 0, (rank, ended)
    # Every worker of the retry found the same checkpoint, at least as new as the one status showed before the kill
    # (the workers compare what they found before training; rank 0 says it).
    log = cluster.kubectl("logs", retry["0"]["metadata"]["name"], namespace=namespace).stdout
    resumed = re.search(r"every worker resumes from /output/crash2/checkpoints/checkpoint-(\d+)", log)
    assert resumed, log[-3000:]
    assert int(resumed.group(1)) >= before["lastCheckpoint"]["step"]
    summary = json.loads((demo_inputs.output(resource) / "summary.json").read_text())
    assert summary["step"] == 120


def test_a_rank_that_never_starts_leaves_the_run_pending_with_why_until_the_rendezvous_timeout(
        cluster, namespace, demo_inputs, crd):
    # Each pod asks for more than half the node's CPU: rank 0 starts, rank 1 fits nowhere (as on a GPU cluster
    # with one free node), and rank 0 waits for it at the rendezvous.
    (node,) = cluster.kubectl_json("get", "nodes")["items"]
    cpu = node["status"]["allocatable"]["cpu"]
    millis = int(cpu[:-1]) if cpu.endswith("m") else int(cpu) * 1000
    resource = one_epoch("lonely", nodes=2, batch=2)
    resource["spec"]["resources"]["cpu"] = f"{millis * 6 // 10}m"
    resource["spec"]["runtime"] = {"backoffLimit": 0, "rendezvousTimeoutSeconds": 20}
    with operator_process(cluster, namespace), StatusRecorder(cluster, namespace, "lonely") as rec:
        apply(cluster, namespace, resource)
        waiting = rec.wait_for(lambda s: s.get("phase") == "Pending" and "rank 1 of 2" in (s.get("message") or ""),
                               RUN_TIMEOUT, "the run to say that rank 1 cannot start")
        ranks = rank_pods(cluster, namespace, "lonely")
        final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")
        samples = rec.all()

    assert condition(waiting, "Running")["reason"] == "Unschedulable", json.dumps(waiting, indent=1)
    assert "Insufficient cpu" in waiting["message"] and "runtime.rendezvousTimeoutSeconds" in waiting["message"]
    assert [p["status"]["phase"] for p in ranks["0"]] == ["Running"]  # rank 0 was up, and waited
    # It never looked like the run was training.
    assert "Running" not in {s.get("phase") for s in samples}
    assert final["phase"] == "Failed", json.dumps(final, indent=1)
    assert condition(final, "Succeeded")["reason"] == "BackoffLimitExceeded"
    assert "last attempt: RendezvousTimeout: the 2 nodes of the run did not all start within 20 s: node 0 waited " \
        "at lonely-0.lonely:" in final["message"], final["message"]
