"""Two operators at once (docs/reliability.md): a second replica by mistake, or an upgrade that overlaps. With
the leader Lease (the chart sets QLORA_LEADER_LEASE), one acts and the other waits: one Job, status from one
view. When the acting one dies, the other takes over within the Lease's duration and the run goes on."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import FAST_METRICS, RUN_TIMEOUT, StatusRecorder, apply, finetune
from tests.cluster.operator_fixture import OperatorProcess

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.cluster]


def test_of_two_operators_one_acts_and_the_other_takes_over_when_it_dies(cluster, namespace, demo_inputs, crd):
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "qlora-operator"}, "spec": {}}  # as the chart makes it
    cluster.kubectl("apply", "-f", "-", input=json.dumps(lease), namespace=namespace)
    settings = {**FAST_METRICS, "leader_lease": f"{namespace}/qlora-operator"}
    first = OperatorProcess(cluster, [namespace], **settings).start()
    second = OperatorProcess(cluster, [namespace], **settings)

    def holder():
        got = cluster.kubectl_json("get", "lease", "qlora-operator", namespace=namespace)
        return got["spec"].get("holderIdentity"), got["spec"].get("leaseTransitions") or 0

    try:
        cluster.wait_until(lambda: holder()[0], timeout=60, what="the first operator to hold the Lease")
        _, taken = holder()
        second.start()  # healthy (its liveness probe passes) while it waits
        cluster.wait_until(lambda: "is held by" in second.log(), timeout=60, what="the second operator to wait")
        resource = finetune("twice", checkpointEvery=100, evalEvery=1000, maxSteps=600, batchSize=2,
                            gradientAccumulationSteps=1)
        with StatusRecorder(cluster, namespace, "twice") as rec:
            apply(cluster, namespace, resource)
            before = rec.wait_for(lambda s: s.get("phase") == "Running" and 5 <= s.get("step", 0) < 300,
                                  RUN_TIMEOUT, "the run to train under the first operator")
            acting, _ = holder()
            first.kill()  # a crash: the Lease is not handed back, the second waits for it to run out
            rec.wait_for(lambda s: s.get("step", 0) > before["step"] + 10, RUN_TIMEOUT,
                         "status to go on under the second operator", after=before)
            final = rec.wait_for(lambda s: s.get("phase") in ("Succeeded", "Failed"), RUN_TIMEOUT, "the end")
            samples = rec.all()
        now, transitions = holder()
    finally:
        first.kill()
        second.stop()

    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert now != acting and transitions == taken + 1 and "holding Lease" in second.log()
    # One Job all along, made by the first operator and adopted by the second.
    (job,) = cluster.kubectl_json("get", "jobs", "-l", "qlora.io/finetune=twice", namespace=namespace)["items"]
    assert final["jobName"] == job["metadata"]["name"] and final["attempts"] == 1
    # One writer at a time: the steps in status never went back.
    steps = [s["step"] for s in samples if s.get("step") is not None]
    assert steps == sorted(steps) and steps[-1] == 600
    # The second operator wrote nothing before it held the Lease: it made no Job and no status while waiting.
    waited = second.log().split("holding Lease")[0]
    assert "twice" not in waited, waited[-3000:]
