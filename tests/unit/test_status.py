"""The status function: (check, Job, pods, previous status) -> phase, conditions, reasons, messages."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from qlora_operator.status import (
    OWNED_FIELDS,
    VALID,
    Check,
    status_from,
    status_patch,
    transition,
)

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=timezone.utc)
LATER = NOW + timedelta(minutes=5)
T0 = "2026-11-27T11:59:00Z"


def job(*conditions, suspend=False, deadline=None, name="run", uid="job-uid", **status):
    return {
        "metadata": {"name": name, "uid": uid},
        "spec": {"suspend": suspend, "activeDeadlineSeconds": deadline,
                 "template": {"spec": {"containers": [{"image": "reg/trainer:1"}]}}},
        "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                   "lastTransitionTime": "2026-11-27T11:59:30Z"} for t, r, m in conditions],
                   **status},
    }


def pod(name="run-abc", phase="Pending", created=T0, conditions=(), waiting=None, running=None, terminated=None,
        reason=None, message=None, deleting=False):
    state = {}
    if waiting:
        state["waiting"] = waiting
    if running:
        state["running"] = {"startedAt": running}
    if terminated:
        state["terminated"] = terminated
    status = {"phase": phase, "conditions": list(conditions)}
    if state:
        status["containerStatuses"] = [{"name": "trainer", "image": "reg/trainer:1", "state": state}]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    meta = {"name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = created
    return {"metadata": meta, "status": status}


def failed_pod(code, message="", name="run-abc", created=T0, reason="Error"):
    return pod(name=name, phase="Failed", created=created, terminated={
        "exitCode": code, "reason": reason, "message": message,
        "startedAt": created, "finishedAt": "2026-11-27T11:59:50Z"})


UNSCHEDULABLE = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}


def decide(job_=None, pods=(), previous=None, check=None, **kw):
    args = dict(generation=2, job=job_, pods=list(pods), now=NOW, previous=previous, check=check,
                model={"name": "org/m", "revision": "main"}, job_name="run", output_path="pvc://adapters/run")
    args.update(kw)
    return status_from(**args)


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def summary(reason, message, **more):
    return json.dumps({"reason": reason, "message": message, **more})


CASES = [
    # id, kwargs, phase, Succeeded (status, reason), message contains
    ("secret-missing", dict(check=Check(False, "SecretNotFound", "Secret hf not found; create it")),
     "Pending", ("Unknown", "SecretNotFound"), "Secret hf not found"),
    ("invalid-spec", dict(check=Check(False, "InvalidSpec", "spec.x: bad", terminal=True)),
     "Failed", ("False", "InvalidSpec"), "spec.x: bad"),
    ("configmap-missing", dict(check=Check(False, "InvalidSpec", "ConfigMap qa not found")),
     "Pending", ("Unknown", "InvalidSpec"), "ConfigMap qa not found"),
    ("creating", dict(check=VALID), "Pending", ("Unknown", "Creating"), "creating"),
    ("job-no-pods", dict(job_=job()), "Pending", ("Unknown", "Starting"), "Job run"),
    ("unschedulable", dict(job_=job(), pods=[pod(conditions=[UNSCHEDULABLE])]),
     "Pending", ("Unknown", "Unschedulable"), "Insufficient nvidia.com/gpu"),
    ("image-pull", dict(job_=job(), pods=[pod(waiting={"reason": "ImagePullBackOff", "message": "not found"})]),
     "Pending", ("Unknown", "ImagePullError"), "reg/trainer:1"),
    ("err-image-pull", dict(job_=job(), pods=[pod(waiting={"reason": "ErrImagePull"})]),
     "Pending", ("Unknown", "ImagePullError"), "runtime.image"),
    ("config-error", dict(job_=job(), pods=[pod(waiting={"reason": "CreateContainerConfigError",
                                                         "message": 'configmap "cfg" not found'})]),
     "Pending", ("Unknown", "ContainerConfigError"), 'configmap "cfg" not found'),
    ("secret-missing-at-the-kubelet", dict(job_=job(), pods=[pod(waiting={
        "reason": "CreateContainerConfigError", "message": 'secret "hf" not found'})]),
     "Pending", ("Unknown", "SecretNotFound"), 'secret "hf" not found'),
    ("secret-key-missing-at-the-kubelet", dict(job_=job(), pods=[pod(waiting={
        "reason": "CreateContainerConfigError", "message": "couldn't find key HF_TOKEN in Secret ml/hf"})]),
     "Pending", ("Unknown", "SecretNotFound"), "couldn't find key HF_TOKEN in Secret ml/hf"),
    ("running", dict(job_=job(active=1), pods=[pod(phase="Running", running=T0)]),
     "Running", ("Unknown", "Running"), "running"),
    ("trainer-done-job-completing", dict(job_=job(), pods=[pod(phase="Succeeded",
                                                               terminated={"exitCode": 0, "startedAt": T0})]),
     "Running", ("Unknown", "Finishing"), "trainer finished"),
    ("succeeded", dict(job_=job(("Complete", "", ""), completionTime="2026-11-27T11:59:59Z"),
                       pods=[pod(phase="Succeeded", terminated={"exitCode": 0, "startedAt": T0})]),
     "Succeeded", ("True", "Succeeded"), "pvc://adapters/run"),
    ("dataset-invalid-summary", dict(
        job_=job(("Failed", "PodFailurePolicy", "Container trainer ... exit code 65")),
        pods=[failed_pod(65, summary("DatasetInvalid", "line 7: no 'answer' field", step=0))]),
     "Failed", ("False", "DatasetInvalid"), "line 7: no 'answer' field"),
    ("model-load-exit-code", dict(
        job_=job(("Failed", "PodFailurePolicy", "exit code 66")),
        pods=[failed_pod(66, "Traceback...\nOSError: org/m is not a valid model identifier")]),
     "Failed", ("False", "ModelLoadFailed"), "not a valid model identifier"),
    ("invalid-config-exit-code", dict(
        job_=job(("Failed", "PodFailurePolicy", "exit code 64")), pods=[failed_pod(64, "")]),
     "Failed", ("False", "InvalidSpec"), "exited with code 64"),
    ("backoff", dict(
        job_=job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")),
        pods=[failed_pod(1, "boom", name=f"run-{i}", created=f"2026-11-27T11:5{i}:00Z") for i in range(4)]),
     "Failed", ("False", "BackoffLimitExceeded"), "failed 4 times"),
    ("backoff-trainer-failed", dict(
        job_=job(("Failed", "BackoffLimitExceeded", "")),
        pods=[failed_pod(70, summary("TrainingFailed", "loss is NaN at step 12"))]),
     "Failed", ("False", "BackoffLimitExceeded"), "loss is NaN at step 12"),
    ("backoff-oomkilled", dict(
        job_=job(("Failed", "BackoffLimitExceeded", "")),
        pods=[failed_pod(1, "x", name="run-0", created="2026-11-27T11:50:00Z"),
              failed_pod(137, "", name="run-1", created="2026-11-27T11:55:00Z", reason="OOMKilled")]),
     "Failed", ("False", "OOMKilled"), "resources.memory"),
    ("backoff-cuda-oom", dict(
        job_=job(("Failed", "BackoffLimitExceeded", "")),
        pods=[failed_pod(67, summary("CUDAOutOfMemory", "CUDA out of memory; lower training.batchSize"))]),
     "Failed", ("False", "CUDAOutOfMemory"), "lower training.batchSize"),
    ("deadline", dict(job_=job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"),
                               deadline=600), pods=[pod(phase="Failed", reason="DeadlineExceeded")]),
     "Failed", ("False", "DeadlineExceeded"), "activeDeadlineSeconds (600s)"),
    ("failure-target-counts", dict(job_=job(("FailureTarget", "DeadlineExceeded", "")), pods=[]),
     "Failed", ("False", "DeadlineExceeded"), "activeDeadlineSeconds"),
    ("suspended", dict(job_=job(suspend=True), suspend=True), "Suspended", ("Unknown", "Suspended"),
     "spec.suspend to false"),
    ("queued", dict(job_=job(suspend=True), queue_name="gpu-queue"), "Pending", ("Unknown", "Queued"),
     "LocalQueue gpu-queue"),
    ("admitted-by-kueue", dict(job_=job(active=1), queue_name="gpu-queue", pods=[pod(phase="Running", running=T0)]),
     "Running", ("Unknown", "Running"), "running"),
    ("retrying", dict(job_=job(failed=1, active=1), pods=[
        failed_pod(70, summary("TrainingFailed", "NCCL timeout"), name="run-0", created="2026-11-27T11:50:00Z"),
        pod(name="run-1", created="2026-11-27T11:58:00Z")]),
     "Pending", ("Unknown", "Retrying"), "NCCL timeout"),
    ("terminating-pod-is-not-running", dict(job_=job(), pods=[pod(phase="Running", running=T0, deleting=True)]),
     "Pending", ("Unknown", "Interrupted"), "its pod is being deleted"),
]


@pytest.mark.parametrize("case, kwargs, phase, succeeded, message", CASES, ids=[c[0] for c in CASES])
def test_decisions(case, kwargs, phase, succeeded, message):
    status = decide(**kwargs)
    assert status["phase"] == phase
    s = cond(status, "Succeeded")
    assert (s["status"], s["reason"]) == succeeded
    assert message in status["message"] and message in s["message"]
    assert "\n" not in status["message"]
    assert status["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])
    assert {c["type"] for c in status["conditions"]} == {"SpecValid", "JobCreated", "Running", "Succeeded",
                                                         "Suspended"}
    assert all(c["reason"].isalnum() and c["reason"][0].isupper() for c in status["conditions"])
    assert set(status) <= set(OWNED_FIELDS)
    assert cond(status, "Running")["status"] == ("True" if phase == "Running" else "False")
    assert (phase in ("Succeeded", "Failed")) == ("completionTime" in status)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(check=Check(False, "SecretNotFound", "m")), ("False", "SecretNotFound")),
        (dict(check=VALID), ("True", "Valid")),
        (dict(), ("Unknown", "Checking")),
        (dict(job_=job()), ("True", "Valid")),  # a Job exists: the spec was valid enough to create it
    ],
)
def test_spec_valid_condition(kwargs, expected):
    c = cond(decide(**kwargs), "SpecValid")
    assert (c["status"], c["reason"]) == expected


def test_spec_check_is_remembered_across_refreshes():
    waiting = decide(check=Check(False, "SecretNotFound", "Secret hf not found"))
    again = decide(previous=waiting, now=LATER)  # a refresh from a watch event carries no check
    assert again == waiting
    failed = decide(check=Check(False, "InvalidSpec", "bad", terminal=True))
    assert decide(previous=failed, now=LATER)["phase"] == "Failed"


def test_job_created_condition_and_job_name():
    before = decide(check=VALID)
    assert cond(before, "JobCreated")["status"] == "False" and "jobName" not in before
    after = decide(job_=job(), previous=before)
    assert cond(after, "JobCreated")["status"] == "True" and after["jobName"] == "run"


def test_last_transition_time_moves_only_when_status_flips():
    first = decide(job_=job(), pods=[pod(conditions=[UNSCHEDULABLE])])
    same = decide(job_=job(), pods=[pod(waiting={"reason": "ErrImagePull"})], previous=first, now=LATER)
    # Running stays False (reason changes): its time stays; Succeeded stays Unknown: same.
    for type_ in ("Running", "Succeeded", "JobCreated", "SpecValid"):
        assert cond(same, type_)["lastTransitionTime"] == cond(first, type_)["lastTransitionTime"]
    assert cond(same, "Running")["reason"] == "ImagePullError"
    running = decide(job_=job(), pods=[pod(phase="Running", running=T0)], previous=same, now=LATER)
    assert cond(running, "Running")["lastTransitionTime"] == "2026-11-27T12:05:00Z"
    assert cond(running, "Succeeded")["lastTransitionTime"] == cond(first, "Succeeded")["lastTransitionTime"]


def test_attempts_start_and_completion_times():
    pods = [failed_pod(70, "", name="run-0", created="2026-11-27T11:50:00Z"),
            pod(name="run-1", phase="Running", running="2026-11-27T11:58:00Z", created="2026-11-27T11:57:00Z"),
            pod(name="run-2", conditions=[UNSCHEDULABLE])]
    status = decide(job_=job(), pods=pods)
    assert status["attempts"] == 2  # the unscheduled pod never started
    assert status["startTime"] == "2026-11-27T11:50:00Z"
    # Pods deleted later do not lower the count or move the start.
    later = decide(job_=job(("Complete", "", ""), completionTime="2026-11-27T12:01:00Z"), pods=[], previous=status)
    assert later["attempts"] == 2 and later["startTime"] == "2026-11-27T11:50:00Z"
    assert later["completionTime"] == "2026-11-27T12:01:00Z"
    assert later["outputPath"] == "pvc://adapters/run"


def test_finished_run_whose_job_was_removed_by_ttl_keeps_its_result():
    done = decide(job_=job(("Complete", "", ""), completionTime="2026-11-27T11:59:59Z"))
    assert decide(job_=None, previous=done, now=LATER, generation=2) == done


def test_a_job_gone_while_running_leaves_the_outcome_unknown_never_failed():
    # The operator was away while the run finished and the Job's TTL removed it: it may have succeeded.
    running = decide(job_=job(), pods=[pod(phase="Running", running=T0)])
    gone = decide(job_=None, previous=running, now=LATER)
    assert gone["phase"] == "Unknown"
    succeeded = cond(gone, "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("Unknown", "JobGone")
    assert "the Job run is gone; its outcome is unknown" in gone["message"]
    assert "pvc://adapters/run" in gone["message"] and "new name" in gone["message"]
    assert cond(gone, "Running")["status"] == "False" and "completionTime" not in gone
    # It stays so: nothing more is looked for.
    assert decide(job_=None, previous=gone, now=LATER + timedelta(minutes=1)) == gone


def test_a_deleted_job_that_had_finished_decides_the_run():
    # The Job's last event (Complete) and its deletion came as one DELETED event: its body still says.
    running = decide(job_=job(), pods=[pod(phase="Running", running=T0)])
    tombstone = job(("Complete", "", ""), completionTime="2026-11-27T11:59:59Z")
    tombstone["metadata"]["deletionTimestamp"] = "2026-11-27T12:00:00Z"
    done = decide(job_=tombstone, previous=running, now=LATER)
    assert done["phase"] == "Succeeded" and done["outputPath"] == "pvc://adapters/run"


DRAINED = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
           "message": "Eviction API: evicting", "lastTransitionTime": "2026-11-27T11:59:40Z"}
PREEMPTED = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
             "message": "Preempted in order to admit critical pod"}


def terminated_by_sigterm(name, created, disruption_condition=None, checkpoint=40, **kw):
    summary_text = json.dumps({"status": "Terminated", "reason": None, "exitCode": 143, "step": 41,
                               "lastCheckpoint": {"step": checkpoint}})
    p = failed_pod(143, summary_text, name=name, created=created, **kw)
    if disruption_condition:
        p["status"]["conditions"] = [disruption_condition]
    return p


@pytest.mark.parametrize("condition_, words", [(DRAINED, "evicted (node drain or eviction API)"),
                                               (PREEMPTED, "preempted by a higher-priority pod")])
def test_an_evicted_or_preempted_trainer_is_interrupted_not_failed(condition_, words):
    evicted = terminated_by_sigterm("run-0", "2026-11-27T11:50:00Z", condition_)
    status = decide(job_=job(active=1), pods=[evicted, pod(name="run-1", created="2026-11-27T11:59:55Z")])
    assert status["phase"] == "Pending"
    assert cond(status, "Succeeded")["reason"] == "Interrupted"
    assert status["message"].startswith(words) and status["message"].endswith(
        "resuming from the checkpoint of step 40")
    assert "{" not in status["message"] and "143" not in status["message"]
    assert transition(None, status).type == "Normal"


def test_a_pod_deleted_by_hand_is_an_interruption_not_a_failure():
    # `kubectl delete pod`: no DisruptionTarget condition, but the trainer saved a checkpoint on the SIGTERM.
    deleted = terminated_by_sigterm("run-0", "2026-11-27T11:50:00Z")
    status = decide(job_=job(active=1), pods=[deleted, pod(name="run-1", created="2026-11-27T11:59:55Z")])
    assert (status["phase"], cond(status, "Succeeded")["reason"]) == ("Pending", "Interrupted")
    assert status["message"] == ("stopped by a SIGTERM (its pod deleted, or its node shut down); resuming from "
                                 "the checkpoint of step 40")
    leaving = pod(name="run-0", phase="Running", running=T0, deleting=True)
    status = decide(job_=job(), pods=[leaving])
    assert status["message"].startswith("its pod is being deleted; the trainer is saving a checkpoint")


def test_kubelet_eviction_without_the_condition_is_an_interruption_too():
    evicted = pod(name="run-0", phase="Failed", reason="Evicted", message="The node was low on resource: memory.")
    status = decide(job_=job(), pods=[evicted])
    assert cond(status, "Succeeded")["reason"] == "Interrupted"
    assert status["message"] == ("evicted: The node was low on resource: memory.; resuming from the last "
                                 "checkpoint")


def test_a_trainer_being_evicted_is_saving_its_checkpoint():
    leaving = pod(name="run-0", phase="Running", running=T0, deleting=True, conditions=[DRAINED])
    status = decide(job_=job(), pods=[leaving])
    assert cond(status, "Succeeded")["reason"] == "Interrupted" and "saving a checkpoint" in status["message"]


def test_disruptions_are_left_out_of_the_failure_count():
    pods = [terminated_by_sigterm(f"run-{i}", f"2026-11-27T11:5{i}:00Z", PREEMPTED) for i in range(3)]
    pods.append(failed_pod(1, "boom", name="run-3", created="2026-11-27T11:54:00Z"))
    pods.append(pod(name="run-4", created="2026-11-27T11:55:00Z"))
    retrying = decide(job_=job(active=1), pods=pods)
    assert retrying["message"].startswith("attempt 1 failed (Error: ")
    failed = decide(job_=job(("Failed", "BackoffLimitExceeded", "")), pods=pods[:4], backoff_limit=0)
    assert "failed 1 times" in failed["message"] and "143" not in failed["message"]


def test_a_summary_without_a_failure_keeps_its_json_out_of_the_message():
    crashed = failed_pod(1, json.dumps({"status": "Failed", "step": 3}))
    status = decide(job_=job(("Failed", "BackoffLimitExceeded", "")), pods=[crashed])
    assert "{" not in status["message"] and "exited with code 1" in status["message"]


def ranked(index, code, text, created=T0, finished="2026-11-27T11:59:50Z"):
    p = failed_pod(code, text, name=f"run-{index}-x", created=created)
    p["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    p["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = finished
    return p


DATASET_INVALID = summary("DatasetInvalid", "line 7: no 'answer' field")


@pytest.mark.parametrize("order", [0, 1])
def test_multi_node_failure_reason_does_not_depend_on_event_order(order):
    # Both ranks of one attempt share a creationTimestamp; rank 1 fails because rank 0 did (and later).
    rank0 = ranked(0, 65, DATASET_INVALID, finished="2026-11-27T11:59:50Z")
    rank1 = ranked(1, 1, "connection reset by peer", finished="2026-11-27T11:59:55Z")
    pods = [rank0, rank1] if order == 0 else [rank1, rank0]
    status = decide(job_=job(("Failed", "BackoffLimitExceeded", "")), pods=pods, backoff_limit=0)
    assert "last attempt: DatasetInvalid" in status["message"]


def test_a_rank_stopped_by_sigterm_is_not_blamed_for_its_peers_failure():
    # Rank 1 failed; the Job controller then stopped rank 0, which saved a checkpoint and exited 143.
    stopped = ranked(0, 143, json.dumps({"status": "Terminated", "reason": None, "exitCode": 143, "step": 9}),
                     finished="2026-11-27T11:59:58Z")
    failed = ranked(1, 70, summary("TrainingFailed", "RuntimeError: boom"), finished="2026-11-27T11:59:50Z")
    status = decide(job_=job(("Failed", "BackoffLimitExceeded", "")), pods=[stopped, failed], backoff_limit=0)
    assert "failed 1 times" in status["message"] and "last attempt: TrainingFailed" in status["message"]
    assert "143" not in status["message"]


def test_the_pod_named_by_the_pod_failure_policy_decides():
    rank0 = ranked(0, 1, "connection reset by peer", finished="2026-11-27T11:59:55Z")
    rank1 = ranked(1, 65, DATASET_INVALID, finished="2026-11-27T11:59:50Z")
    policy = ("Failed", "PodFailurePolicy", "Container trainer for pod ns/run-1-x failed with exit code 65 "
              "matching FailJob rule at index 1")
    for pods in ([rank0, rank1], [rank1, rank0]):
        status = decide(job_=job(policy), pods=pods)
        assert cond(status, "Succeeded")["reason"] == "DatasetInvalid"


def test_without_rank_or_policy_the_failure_that_ended_last_decides():
    a = ranked(0, 66, "OSError: cannot load", finished="2026-11-27T11:59:59Z")
    b = ranked(0, 1, "boom", finished="2026-11-27T11:59:10Z")
    for pods in ([a, b], [b, a]):
        status = decide(job_=job(("Failed", "JobFailed", "")), pods=pods)
        assert cond(status, "Succeeded")["reason"] == "ModelLoadFailed"


def test_an_oom_kill_names_the_memory_limit():
    killed = failed_pod(137, "", reason="OOMKilled")
    killed["spec"] = {"containers": [{"name": "trainer", "resources": {"limits": {"memory": "2Gi"}}}]}
    status = decide(job_=job(("Failed", "BackoffLimitExceeded", "")), pods=[killed], backoff_limit=0)
    assert cond(status, "Succeeded")["reason"] == "OOMKilled"
    assert status["message"].startswith("the trainer was killed for going over its memory limit (2Gi); raise "
                                        "resources.memory")


def test_a_trainer_killed_by_a_signal_is_said_so_not_its_last_log_line():
    killed = failed_pod(137, "loading weights\n  warnings.warn(\n")
    status = decide(job_=job(), pods=[killed])
    assert (status["phase"], cond(status, "Running")["reason"]) == ("Pending", "Retrying")
    assert "(Killed: the trainer was killed by SIGKILL (exit code 137) before it could say why)" in status["message"]
    assert "warn" not in status["message"]


def indexed_job(ranks=2):
    j = job()
    j["spec"].update({"completionMode": "Indexed", "completions": ranks})
    return j


def rank_pod(index, **kw):
    p = pod(name=f"run-{index}-x", **kw)
    p["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return p


def test_a_multi_node_run_waits_while_a_rank_cannot_start_and_says_which_and_why():
    # Rank 0 runs and waits at the rendezvous; rank 1 fits no node, or its image cannot be pulled.
    running = rank_pod(0, phase="Running", running=T0)
    unplaced = rank_pod(1, conditions=[UNSCHEDULABLE])
    status = decide(job_=indexed_job(), pods=[running, unplaced])
    assert status["phase"] == "Pending"
    assert cond(status, "Running")["reason"] == "Unschedulable"
    assert status["message"].startswith("rank 1 of 2: no node can run the trainer pod: 0/1 nodes are available")
    assert "runtime.rendezvousTimeoutSeconds" in status["message"]

    pulling = rank_pod(1, waiting={"reason": "ImagePullBackOff", "message": "not found"})
    status = decide(job_=indexed_job(), pods=[running, pulling])
    assert (status["phase"], cond(status, "Running")["reason"]) == ("Pending", "ImagePullError")
    assert status["message"].startswith("rank 1 of 2: cannot pull image reg/trainer:1")


def test_a_multi_node_run_runs_once_every_rank_is_up_or_done():
    running = rank_pod(0, phase="Running", running=T0)
    starting = rank_pod(1, waiting={"reason": "ContainerCreating"})
    status = decide(job_=indexed_job(), pods=[running, starting])
    assert (status["phase"], cond(status, "Running")["reason"]) == ("Pending", "Starting")
    assert status["message"].startswith("rank 1 of 2 not running yet")

    both = [running, rank_pod(1, phase="Running", running=T0)]
    assert decide(job_=indexed_job(), pods=both)["phase"] == "Running"
    # Rank 1 ends first; rank 0 still writes the adapter.
    done = rank_pod(1, phase="Succeeded", terminated={"exitCode": 0, "reason": "Completed"})
    assert decide(job_=indexed_job(), pods=[running, done])["phase"] == "Running"
    # One pod of a plain Job (one node, any number of GPUs) runs alone.
    assert decide(job_=job(), pods=[pod(phase="Running", running=T0)])["phase"] == "Running"


def test_a_rendezvous_timeout_is_the_failure_a_person_reads():
    timed_out = ranked(0, 71, summary("RendezvousTimeout", "the 2 nodes of the run did not all start within 30 s"))
    status = decide(job_=job(("Failed", "BackoffLimitExceeded", "")), pods=[timed_out], backoff_limit=0)
    assert "last attempt: RendezvousTimeout: the 2 nodes of the run did not all start within 30 s" in status["message"]


@pytest.mark.parametrize("event, reason", [
    ('Error creating: pods "run-x" is forbidden: exceeded quota: gpu, requested: requests.nvidia.com/gpu=1, '
     'used: requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4', "QuotaExceeded"),
    ('Error creating: pods "run-x" is forbidden: violates PodSecurity "restricted:latest": seccompProfile',
     "PodCreateRefused"),
    ('Error creating: admission webhook "deny.example.com" denied the request: no', "PodCreateRefused"),
])
def test_a_pod_that_cannot_be_created_says_why_while_it_may_clear(event, reason):
    status = decide(job_=job(), pods=[], create_failure=event)
    assert status["phase"] == "Pending"
    succeeded = cond(status, "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("Unknown", reason)
    assert event in status["message"] and transition(None, status).type == "Warning"
    # Once a pod exists, the Event is old news.
    assert cond(decide(job_=job(), pods=[pod(phase="Running", running=T0)], create_failure=event),
                "Succeeded")["reason"] == "Running"


def test_model_is_reported():
    assert decide(check=VALID)["model"] == {"name": "org/m", "revision": "main"}


def test_tokens_never_reach_a_message():
    token = "hf_" + "A1b2C3d4" * 5
    status = decide(job_=job(("Failed", "PodFailurePolicy", "")),
                    pods=[failed_pod(66, f"401 Unauthorized for token {token}\nOSError: cannot load")])
    assert token not in json.dumps(status)
    failing = decide(job_=job(("Failed", "PodFailurePolicy", "")), pods=[failed_pod(66, f"bad token {token}")])
    assert token not in json.dumps(failing) and "hf_***" in failing["message"]


def test_messages_are_one_bounded_line():
    long = "x" * 5000
    status = decide(check=Check(False, "InvalidSpec", long + "\n" + long, terminal=True))
    assert len(status["message"]) <= 1000 and "\n" not in status["message"]


# ------------------------------------------------------------------------------- patches and events

def test_patch_only_touches_owned_fields_and_only_changes():
    current = {"phase": "Running", "message": "m", "progress": "42%", "loss": 1.2, "startTime": T0}
    desired = {"phase": "Succeeded", "message": "m", "completionTime": "t"}
    patch = status_patch(current, desired)
    assert patch == {"phase": "Succeeded", "completionTime": "t", "startTime": None}
    assert "progress" not in patch and "loss" not in patch
    assert status_patch(desired, dict(desired)) == {}


def test_patch_with_extra_owned_fields():
    assert status_patch({"loss": 1.0}, {"loss": 0.5, "phase": "Running"}, owned=("phase", "loss")) == {
        "loss": 0.5, "phase": "Running"}


@pytest.mark.parametrize(
    "before, after, expected",
    [
        (None, decide(check=VALID), ("Normal", "Creating")),
        (decide(check=VALID), decide(check=VALID, now=LATER), None),
        (decide(job_=job()), decide(job_=job(), pods=[pod(conditions=[UNSCHEDULABLE])]),
         ("Warning", "Unschedulable")),
        (decide(job_=job()), decide(job_=job(), pods=[pod(phase="Running", running=T0)]), ("Normal", "Running")),
        (decide(job_=job()), decide(job_=job(("Failed", "DeadlineExceeded", ""))), ("Warning", "DeadlineExceeded")),
        (decide(job_=job()), decide(job_=job(("Complete", "", ""))), ("Normal", "Succeeded")),
        (decide(check=VALID), decide(check=Check(False, "SecretNotFound", "no Secret")), ("Warning", "SecretNotFound")),
    ],
)
def test_transition_events(before, after, expected):
    event = transition(before, after)
    if expected is None:
        assert event is None
    else:
        assert (event.type, event.reason) == expected
        assert after["phase"] in event.message


def test_attempts_count_pods_that_come_and_go():
    first = pod(name="run-0", phase="Running", running=T0)
    first["metadata"]["uid"] = "pod-0"
    running = decide(job_=job(), pods=[first], counted_pods=set())
    assert running["attempts"] == 1
    # Suspended and resumed: the first pod is deleted, a second one starts.
    second = pod(name="run-1", phase="Running", running="2026-11-27T11:59:40Z")
    second["metadata"]["uid"] = "pod-1"
    resumed = decide(job_=job(), pods=[second], previous=running, counted_pods={"pod-0"})
    assert resumed["attempts"] == 2
    # The same pods seen again (another refresh) count nothing new.
    assert decide(job_=job(), pods=[second], previous=resumed, counted_pods={"pod-0", "pod-1"})["attempts"] == 2
    # Not known (operator just restarted): the pods seen now are taken as counted already.
    assert decide(job_=job(), pods=[second], previous=resumed, counted_pods=None)["attempts"] == 2


@pytest.mark.parametrize("reason, word", [("OOMKilled", "OOMKilled"), ("node-shutdown", "NodeShutdown"),
                                          ("", "Unknown"), ("137 killed", "Reason137Killed")])
def test_condition_reasons_are_one_camel_case_word(reason, word):
    from qlora_operator.status import camel_word
    assert camel_word(reason) == word
