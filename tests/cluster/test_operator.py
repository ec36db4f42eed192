"""The operator against a real API server, Job controller, scheduler and garbage collector.

The trainer is stood in by tests/cluster/standin (image `qlora-standin:1`): it validates the config the operator
wrote, then runs and exits as its environment says, writing the trainer's termination summary.
"""

from __future__ import annotations

import json

import pytest

from tests.cluster.kueue_fixture import kueue  # noqa: F401
from tests.cluster.operator_fixture import crd, finetune, operator, standin_image, start_operator  # noqa: F401

pytestmark = pytest.mark.cluster

LABEL = "qlora.io/finetune"


@pytest.fixture
def inputs(cluster, kubectl):
    """The objects a run names: a dataset ConfigMap and an output volume."""
    kubectl("create", "configmap", "qa", "--from-literal=data.jsonl="
            + json.dumps({"question": "What is QLoRA?", "answer": "Low-rank adapters on a 4-bit model."}))
    kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "adapters"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
    cluster.wait_until(lambda: kubectl.json("get", "pvc", "adapters")["status"].get("phase") == "Bound",
                       timeout=60, what="the output volume to be bound")


def apply(kubectl, obj: dict) -> None:
    kubectl("apply", "-f", "-", input=json.dumps(obj))


def status(kubectl, name: str) -> dict:
    return kubectl.json("get", "qlorafinetune", name).get("status") or {}


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions") or () if c["type"] == type_), {})


def wait_for(cluster, kubectl, name: str, phase: str, reason: str | None = None, timeout: float = 90,
             message: str = "") -> dict:
    """The status once it has `phase` (and the Succeeded condition `reason`, and `message` in its message)."""
    def reached():
        st = status(kubectl, name)
        if st.get("phase") == phase and (reason is None or condition(st, "Succeeded").get("reason") == reason) \
                and message in (st.get("message") or ""):
            return st
        return None
    return cluster.wait_until(reached, timeout=timeout, what=f"{name} to be {phase} {reason or ''} "
                              f"(last: {status(kubectl, name).get('phase')}, {status(kubectl, name).get('message')})")


def jobs(kubectl, name: str) -> list[dict]:
    return kubectl.json("get", "jobs", "-l", f"{LABEL}={name}")["items"]


def events(kubectl, name: str) -> list[dict]:
    items = kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name}")["items"]
    return [e for e in items if e["involvedObject"].get("kind") == "QLoRAFinetune"]


# ------------------------------------------------------------------------------------------- tests

def test_job_as_the_api_server_stores_it(cluster, kubectl, operator, inputs, standin_image):
    kubectl("create", "secret", "generic", "hf", "--from-literal=HF_TOKEN=hf_secretvalue0123456789abcdef")
    apply(kubectl, finetune(
        "stored", standin_image, suspend=True,
        model={"name": "org/model", "tokenSecretRef": {"name": "hf"}},
        resources={"gpus": 1, "cpu": "2", "memory": "4Gi", "nodeSelector": {"kubernetes.io/os": "linux"},
                   "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        runtime={"backoffLimit": 2, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600,
                 "env": [{"name": "WANDB_MODE", "value": "offline"}]}))
    st = wait_for(cluster, kubectl, "stored", "Suspended")
    assert st["jobName"] == "stored" and condition(st, "JobCreated")["status"] == "True"
    assert condition(st, "Suspended")["status"] == "True"
    assert st["model"] == {"name": "org/model", "revision": "main"}

    qft = kubectl.json("get", "qlorafinetune", "stored")
    (job,) = jobs(kubectl, "stored")
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "qlora.io/v1alpha1", "kind": "QLoRAFinetune", "name": "stored",
        "uid": qft["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    labels = job["metadata"]["labels"]
    assert labels[LABEL] == "stored" and labels["app.kubernetes.io/managed-by"] == "qlora-operator"
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (2, 3600, 600)
    assert spec["suspend"] is True and spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["Ignore", "Ignore", "FailJob", "Count"]
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [143]}
    assert rules[2]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [64, 65, 66]}
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] == 120
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "gpu"
    c = pod["containers"][0]
    assert c["image"] == standin_image and c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # The template keeps what was written; pods get their GPU request from the limit when created.
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1", "memory": "4Gi"},
                              "requests": {"cpu": "2", "memory": "4Gi"}}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["ports"][0]["name"] == "metrics" and c["ports"][0]["containerPort"] == 9090
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}
    assert env["WANDB_MODE"]["value"] == "offline"

    cm = kubectl.json("get", "configmap", "stored-config")
    assert cm["metadata"]["ownerReferences"][0]["uid"] == qft["metadata"]["uid"]
    config = json.loads(cm["data"]["config.json"])
    assert config["model"]["name"] == "org/model" and config["dataset"]["path"] == "/data/data.jsonl"
    assert config["output"]["dir"] == "/output/stored"
    everything = json.dumps([cm, job, st, events(kubectl, "stored")])
    assert "hf_secretvalue" not in everything


def test_multi_node_run_is_an_indexed_job_with_a_headless_service(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("multi", standin_image, suspend=True, resources={"gpus": 0, "nodes": 2}))
    wait_for(cluster, kubectl, "multi", "Suspended")
    (job,) = jobs(kubectl, "multi")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["template"]["spec"]["subdomain"] == "multi"
    svc = kubectl.json("get", "service", "multi")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "QLoRAFinetune"


def test_a_run_succeeds(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("ok", standin_image, env={"STANDIN_SLEEP": 2}))
    kubectl("wait", "--for=condition=Succeeded", "qlorafinetune/ok", "--timeout=90s", timeout=100)
    st = status(kubectl, "ok")
    assert st["phase"] == "Succeeded" and st["attempts"] == 1
    assert st["outputPath"] == "pvc://adapters/ok"
    assert st["startTime"] <= st["completionTime"]
    assert st["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in st["conditions"]} == {
        "SpecValid": "True", "JobCreated": "True", "Running": "False", "Succeeded": "True", "Suspended": "False"}
    reasons = [e["reason"] for e in events(kubectl, "ok")]
    assert "Succeeded" in reasons and all(e["type"] == "Normal" for e in events(kubectl, "ok"))
    metrics = cluster.wait_until(lambda: (lambda m: m if 'qlora_operator_finetunes{phase="Succeeded"} 1.0' in m
                                          else None)(operator.metrics()), timeout=10, what="the phase gauge")
    assert "qlora_operator_job_created_seconds_count 1.0" in metrics
    assert "qlora_operator_running_seconds_count" in metrics


@pytest.mark.parametrize(
    "name, changes, reason, message",
    [
        ("too-many-gpus", dict(resources={"gpus": 64}), "Unschedulable", "Insufficient nvidia.com/gpu"),
        ("unknown-image", dict(runtime={"image": "registry.invalid/nothing:1"}), "ImagePullError",
         "registry.invalid/nothing:1"),
    ],
)
def test_a_run_that_cannot_start_says_why(cluster, kubectl, operator, inputs, standin_image, name, changes, reason,
                                          message):
    apply(kubectl, finetune(name, standin_image, **changes))
    st = wait_for(cluster, kubectl, name, "Pending", reason, message=message)
    assert message in condition(st, "Running")["message"]
    assert condition(st, "Running")["reason"] == reason
    warning = cluster.wait_until(lambda: [e for e in events(kubectl, name) if e["reason"] == reason],
                                 timeout=10, what=f"a {reason} event")
    assert warning[0]["type"] == "Warning"


def test_trainer_failure_reason_fails_at_once(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("bad-data", standin_image, runtime={"backoffLimit": 3},
                            env={"STANDIN_EXIT": 65, "STANDIN_MESSAGE": "line 1: no 'answer' field"}))
    st = wait_for(cluster, kubectl, "bad-data", "Failed", "DatasetInvalid")
    assert "line 1: no 'answer' field" in st["message"]
    assert st["attempts"] == 1  # the podFailurePolicy failed the Job without retries
    assert condition(st, "Succeeded")["status"] == "False"
    assert [e["type"] for e in events(kubectl, "bad-data") if e["reason"] == "DatasetInvalid"] == ["Warning"]


def test_failure_reason_from_the_exit_code_alone(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("no-summary", standin_image, env={"STANDIN_EXIT": 66, "STANDIN_SUMMARY": 0,
                                                               "STANDIN_MESSAGE": "cannot load org/model"}))
    st = wait_for(cluster, kubectl, "no-summary", "Failed", "ModelLoadFailed")
    assert "cannot load org/model" in st["message"]  # the log's last line (FallbackToLogsOnError)


def test_retries_until_the_backoff_limit(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("flaky", standin_image, runtime={"backoffLimit": 1},
                            env={"STANDIN_EXIT": 70, "STANDIN_MESSAGE": "loss is NaN"}))
    st = wait_for(cluster, kubectl, "flaky", "Failed", "BackoffLimitExceeded", timeout=120)
    assert st["attempts"] == 2
    assert "loss is NaN" in st["message"] and "runtime.backoffLimit (1)" in st["message"]


def test_deadline(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("slow", standin_image, runtime={"activeDeadlineSeconds": 3}, env={"STANDIN_SLEEP": 300}))
    st = wait_for(cluster, kubectl, "slow", "Failed", "DeadlineExceeded")
    assert "activeDeadlineSeconds (3s)" in st["message"]


def test_missing_secret_then_created(cluster, kubectl, operator, inputs, standin_image):
    # The operator reads no Secret: the kubelet finds it missing, and the run waits with that reason.
    apply(kubectl, finetune("later", standin_image, model={"tokenSecretRef": {"name": "hf-later"}}))
    st = wait_for(cluster, kubectl, "later", "Pending", "SecretNotFound")
    assert condition(st, "Succeeded")["status"] == "Unknown"
    assert 'secret "hf-later" not found' in st["message"]
    kubectl("create", "secret", "generic", "hf-later", "--from-literal=HF_TOKEN=hf_x")
    st = wait_for(cluster, kubectl, "later", "Succeeded", timeout=120)  # the kubelet tries again; no edit
    assert condition(st, "SpecValid")["status"] == "True"


def test_missing_dataset_key_is_invalid_until_fixed(cluster, kubectl, operator, inputs, standin_image):
    body = finetune("wrong-key", standin_image)
    body["spec"]["dataset"]["configMap"]["key"] = "train.jsonl"
    apply(kubectl, body)
    st = wait_for(cluster, kubectl, "wrong-key", "Pending", "InvalidSpec")
    assert "has no key train.jsonl" in st["message"] and "data.jsonl" not in st["message"]  # keys stay private
    kubectl("patch", "configmap", "qa", "--type=merge", "-p", json.dumps({"data": {"train.jsonl": "{}"}}))
    wait_for(cluster, kubectl, "wrong-key", "Succeeded", timeout=120)


def test_suspend_and_resume(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("pause", standin_image, env={"STANDIN_SLEEP": 600}))
    wait_for(cluster, kubectl, "pause", "Running")
    kubectl("patch", "qlorafinetune", "pause", "--type=merge", "-p", '{"spec": {"suspend": true}}')
    st = wait_for(cluster, kubectl, "pause", "Suspended")
    assert condition(st, "Suspended")["status"] == "True"
    assert jobs(kubectl, "pause")[0]["spec"]["suspend"] is True
    cluster.wait_until(lambda: not [p for p in kubectl.json("get", "pods", "-l", f"{LABEL}=pause")["items"]
                                    if p["status"].get("phase") in ("Pending", "Running")],
                       timeout=60, what="the pod to stop")
    kubectl("patch", "qlorafinetune", "pause", "--type=merge", "-p", '{"spec": {"suspend": false}}')
    st = wait_for(cluster, kubectl, "pause", "Running")
    assert condition(st, "Suspended")["status"] == "False"
    assert st["attempts"] == 2
    assert len(jobs(kubectl, "pause")) == 1


def test_queued_runs_wait_for_kueue_to_admit_them(cluster, kubectl, operator, inputs, standin_image, kueue):
    # Issue 16, item 5: Kueue itself admits the Jobs, within a ClusterQueue's quota of one GPU.
    ns = kubectl.namespace
    apply(kubectl, kueue.cluster_queue(ns, cpu="4", memory="8Gi", gpus=1, namespaces=[ns]))
    try:
        apply(kubectl, kueue.local_queue("gpu-queue", ns, ns))
        one_gpu = {"gpus": 1, "cpu": "1", "memory": "1Gi"}
        apply(kubectl, finetune("first", standin_image, runtime={"queueName": "gpu-queue"}, resources=one_gpu,
                                env={"STANDIN_SLEEP": 600}))
        wait_for(cluster, kubectl, "first", "Running")
        (first,) = jobs(kubectl, "first")
        assert first["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        admitted = kueue.workload(kubectl, first)["status"]
        assert condition(admitted, "Admitted")["status"] == "True" and admitted["admission"]["clusterQueue"] == ns

        # Over quota: the Job stays suspended, and the user reads that it waits for its queue.
        apply(kubectl, finetune("second", standin_image, runtime={"queueName": "gpu-queue"}, resources=one_gpu,
                                env={"STANDIN_SLEEP": 2}))
        st = wait_for(cluster, kubectl, "second", "Pending", "Queued")
        assert st["message"] == "waiting for Kueue to admit the Job from LocalQueue gpu-queue"
        assert condition(st, "Suspended")["status"] == "True" and condition(st, "Succeeded")["status"] == "Unknown"
        (second,) = jobs(kubectl, "second")
        assert second["spec"]["suspend"] is True

        def pending_reason():
            wl = kueue.workload(kubectl, second)
            reserved = condition((wl or {}).get("status") or {}, "QuotaReserved")
            return reserved.get("status") == "False" and reserved["message"]
        reason = cluster.wait_until(pending_reason, timeout=30, what="Kueue to say why the second run waits")
        assert "insufficient unused quota for nvidia.com/gpu" in reason
        assert jobs(kubectl, "second")[0]["spec"]["suspend"] is True
        assert status(kubectl, "second")["phase"] == "Pending"

        kubectl("delete", "qlorafinetune", "first", "--wait=true", timeout=60)  # its GPU goes back to the queue
        wait_for(cluster, kubectl, "second", "Succeeded", timeout=120)
        assert condition(kueue.workload(kubectl, second)["status"], "Admitted")["status"] == "True"
    finally:
        cluster.kubectl("delete", "clusterqueue", ns, "--wait=false", check=False)


def test_operator_killed_mid_run_adopts_the_job(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("restart", standin_image, env={"STANDIN_SLEEP": 8}))
    wait_for(cluster, kubectl, "restart", "Running")
    (before,) = jobs(kubectl, "restart")
    operator.kill()
    operator.start()
    st = wait_for(cluster, kubectl, "restart", "Succeeded")
    (after,) = jobs(kubectl, "restart")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # adopted, not recreated
    assert st["attempts"] == 1
    assert "created Job" in operator.log() and "created Job" not in operator.log(since_start=True)
    running = [e for e in events(kubectl, "restart") if e["reason"] == "Running"]
    assert len(running) == 1  # no false transition after the restart


def test_deleting_the_resource_deletes_its_children(cluster, kubectl, operator, inputs, standin_image):
    apply(kubectl, finetune("gone", standin_image, env={"STANDIN_SLEEP": 600}))
    wait_for(cluster, kubectl, "gone", "Running")
    qft = kubectl.json("get", "qlorafinetune", "gone")
    assert not qft["metadata"].get("finalizers")  # nothing blocks deletion, even with the operator down
    kubectl("delete", "qlorafinetune", "gone", "--wait=true", timeout=60)

    def children():
        return (kubectl.json("get", "jobs,configmaps,pods", "-l", f"{LABEL}=gone")["items"])
    cluster.wait_until(lambda: children() == [], timeout=120, what="the garbage collector to delete the children")


def test_operator_settings_give_the_defaults_and_the_namespaces(cluster, kubectl, crd, inputs, standin_image):
    other = f"{kubectl.namespace}-other"
    cluster.kubectl("create", "namespace", other)
    try:
        with start_operator(cluster, [kubectl.namespace], trainer_image=standin_image,
                            default_base_model="org/house-model"):
            # Applied first: by the time the watched one has succeeded, it would have been seen if watched.
            cluster.kubectl("apply", "-f", "-", namespace=other, input=json.dumps(finetune("ignored", standin_image)))
            body = finetune("defaults", standin_image)
            del body["spec"]["runtime"]["image"]
            apply(kubectl, body)
            st = wait_for(cluster, kubectl, "defaults", "Succeeded")
            assert st["model"]["name"] == "org/house-model"
            (job,) = jobs(kubectl, "defaults")
            assert job["spec"]["template"]["spec"]["containers"][0]["image"] == standin_image
            assert cluster.kubectl_json("get", "qlorafinetune", "ignored", namespace=other).get("status") is None
            assert cluster.kubectl_json("get", "jobs", namespace=other)["items"] == []
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_a_spec_the_schema_lets_through_but_the_operator_cannot_run_fails(cluster, kubectl, operator, inputs,
                                                                          standin_image):
    apply(kubectl, finetune("overlap", standin_image, model={"pvc": {"claimName": "adapters", "path": "base"}},
                            output={"pvc": {"claimName": "adapters", "path": "base/out"}}))
    st = wait_for(cluster, kubectl, "overlap", "Failed", "InvalidSpec")
    assert "spec.output.pvc" in st["message"]
    assert condition(st, "SpecValid")["status"] == "False" and jobs(kubectl, "overlap") == []
    assert [e["type"] for e in events(kubectl, "overlap") if e["reason"] == "InvalidSpec"] == ["Warning"]


def test_a_job_removed_by_its_ttl_while_the_operator_was_down_is_unknown_never_failed(cluster, kubectl, operator,
                                                                                       inputs, standin_image):
    # Issue 20, item 1: the run finished and its Job was removed while the operator was away (an upgrade).
    apply(kubectl, finetune("away", standin_image, env={"STANDIN_SLEEP": 3},
                            runtime={"ttlSecondsAfterFinished": 1}))
    wait_for(cluster, kubectl, "away", "Running")
    operator.stop()
    cluster.wait_until(lambda: not jobs(kubectl, "away"), timeout=120, what="the TTL controller to remove the Job")
    operator.start()
    st = wait_for(cluster, kubectl, "away", "Unknown", "JobGone", message="its outcome is unknown")
    assert condition(st, "Succeeded")["status"] == "Unknown" and "completionTime" not in st
    assert not [e for e in events(kubectl, "away") if e["reason"] in ("JobDeleted", "JobFailed")]
    assert not jobs(kubectl, "away")  # and it is never run twice


def test_a_status_write_for_a_deleted_object_does_not_land_on_its_successor(cluster, kubectl, crd, monkeypatch):
    # Issue 20, item 3: the reporter writes status with the resourceVersion it computed it from; the API server
    # refuses such a write once the name stands for a new object.
    import asyncio

    from qlora_operator.kube import ApiError, Kube

    body = finetune("again")
    apply(kubectl, body)
    old = kubectl.json("get", "qlorafinetune", "again")
    kubectl("delete", "qlorafinetune", "again", "--wait=true")
    apply(kubectl, body)
    new = kubectl.json("get", "qlorafinetune", "again")
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    async def write(resource_version):
        kube = await Kube.connect()
        try:
            return await kube.patch_status(kubectl.namespace, "again", {"message": "the old run's verdict"},
                                           resource_version=resource_version)
        finally:
            await kube.close()

    with pytest.raises(ApiError) as refused:
        asyncio.run(write(old["metadata"]["resourceVersion"]))
    assert refused.value.conflict
    assert "message" not in status(kubectl, "again")
    written = asyncio.run(write(new["metadata"]["resourceVersion"]))
    assert written["status"]["message"] == "the old run's verdict"


def test_a_pod_the_quota_refuses_says_why(cluster, kubectl, operator, inputs, standin_image):
    # Issue 20, item 10: the Job controller cannot create the pod; its FailedCreate Events say why.
    kubectl("create", "quota", "no-pods", "--hard=pods=0")
    apply(kubectl, finetune("refused", standin_image))
    st = wait_for(cluster, kubectl, "refused", "Pending", "QuotaExceeded", message="exceeded quota: no-pods")
    assert condition(st, "Succeeded")["status"] == "Unknown"
    kubectl("delete", "quota", "no-pods")  # it may clear: then the run starts
    wait_for(cluster, kubectl, "refused", "Succeeded", timeout=120)


def test_a_rank_evicted_alone_restarts_the_whole_group(cluster, kubectl, operator, inputs, standin_image):
    # Issue 20, item 8: a rank replaced alone would wait in the old rendezvous for peers that never come back.
    apply(kubectl, finetune("group", standin_image, env={"STANDIN_SLEEP": 600}, resources={"gpus": 0, "nodes": 2},
                            runtime={"backoffLimit": 2}))

    def running_ranks():
        pods = kubectl.json("get", "pods", "-l", f"{LABEL}=group")["items"]
        live = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p["metadata"]["name"]
                for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")}
        return live if len(live) == 2 else None

    first = cluster.wait_until(running_ranks, timeout=90, what="both ranks running")
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": first["1"], "namespace": kubectl.namespace}}
    kubectl("create", "--raw", f"/api/v1/namespaces/{kubectl.namespace}/pods/{first['1']}/eviction", "-f", "-",
            input=json.dumps(eviction))

    def regrouped():
        (job,) = jobs(kubectl, "group")
        now = running_ranks()
        resumed = not job["spec"].get("suspend") and "qlora.io/regroup" not in job["metadata"].get("annotations", {})
        return now if resumed and now and not set(now.values()) & set(first.values()) else None

    cluster.wait_until(regrouped, timeout=180, what="both ranks restarted together")
    st = wait_for(cluster, kubectl, "group", "Running")
    assert condition(st, "Succeeded")["status"] == "Unknown"  # the eviction was no failure
