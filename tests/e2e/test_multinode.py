"""A two-node run on the local cluster (issue 18, item 1): `resources: {nodes: 2, gpus: 0}` is an Indexed Job of
two pods in the trainer image that rendezvous through the run's headless Service (the cluster's DNS, the pod
network; gloo on the CPU) and train one model. Rank 0 alone serves the metrics status reads and writes the
adapter and the summary; the run takes as many optimizer steps as one node with the same global batch.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import RUN_TIMEOUT, StatusRecorder, apply, finetune, operator_process

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
