"""A multi-node run's ranks restart together: when the Job is suspended and resumed, from pods as the API
server shows them (times at one-second resolution)."""

from datetime import datetime, timezone

import pytest

from qlora_operator import regroup
from qlora_operator.status import status_from

INDEX = "batch.kubernetes.io/job-completion-index"


def job(suspend=False, annotation=None, active=2, nodes=2, mode="Indexed", queue=None, conditions=()):
    meta = {"name": "bot", "namespace": "ml", "uid": "job-1", "annotations": {}, "labels": {}}
    if annotation:
        meta["annotations"][regroup.ANNOTATION] = annotation
    if queue:
        meta["labels"]["kueue.x-k8s.io/queue-name"] = queue
    return {"metadata": meta,
            "spec": {"completionMode": mode, "completions": nodes, "suspend": suspend,
                     "template": {"spec": {"containers": [{"image": "t:1"}]}}},
            "status": {"active": active, "conditions": [{"type": t, "status": "True"} for t in conditions]}}


def rank(index, name=None, phase="Running", started="2026-11-27T12:00:10Z", created="2026-11-27T12:00:00Z",
         finished=None, deleting=None):
    state = {"running": {"startedAt": started}} if phase == "Running" else \
        {"terminated": {"exitCode": 143, "startedAt": started, "finishedAt": finished}}
    meta = {"name": name or f"bot-{index}", "creationTimestamp": created, "annotations": {INDEX: str(index)}}
    if deleting:
        meta["deletionTimestamp"] = deleting
    return {"metadata": meta, "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}


PREEMPTED_LATER = rank(1, "bot-1-old", phase="Failed", finished="2026-11-27T12:30:00Z")


def test_ranks_that_started_together_run_on():
    assert regroup.next_step(job(), [rank(0), rank(1)]) is None


@pytest.mark.parametrize("gone", [
    PREEMPTED_LATER,
    rank(1, "bot-1-old", deleting="2026-11-27T12:32:00Z"),  # being evicted: its deletion was asked for
])
def test_a_rank_gone_mid_run_suspends_the_job_with_why(gone):
    replacement = rank(1, "bot-1-new", phase="Pending", created="2026-11-27T12:30:01Z")
    patch = regroup.next_step(job(), [rank(0), gone, replacement])
    assert patch["spec"] == {"suspend": True}
    assert "rank 1 stopped while rank 0 ran" in patch["metadata"]["annotations"][regroup.ANNOTATION]


def test_the_regrouping_job_is_resumed_once_no_pod_is_left():
    suspended = job(suspend=True, annotation="rank 1 stopped", active=0)
    stopping = rank(0, deleting="2026-11-27T12:32:00Z")
    assert regroup.next_step(job(suspend=True, annotation="rank 1 stopped", active=1), [stopping]) is None
    assert regroup.next_step(suspended, [stopping]) is None  # still stopping
    assert regroup.next_step(suspended, [PREEMPTED_LATER]) == {
        "metadata": {"annotations": {regroup.ANNOTATION: None}}, "spec": {"suspend": False}}


def test_the_new_group_is_not_stranded_by_the_old_groups_pods():
    after = [PREEMPTED_LATER, rank(0, "bot-0-new", started="2026-11-27T12:33:00Z"),
             rank(1, "bot-1-new", started="2026-11-27T12:33:01Z")]
    assert regroup.next_step(job(), after) is None


@pytest.mark.parametrize("other", [
    job(nodes=1, mode="NonIndexed"),  # one pod: nothing to wait for
    job(suspend=True),  # the user suspended it
    job(queue="gpu"),  # Kueue owns suspend
    job(conditions=("Failed",)),
])
def test_what_is_left_alone(other):
    assert regroup.next_step(other, [rank(0), PREEMPTED_LATER]) is None


def test_a_regrouping_run_says_so_and_is_not_suspended_by_the_user():
    status = status_from(generation=1, job=job(suspend=True, annotation="rank 1 stopped while rank 0 ran; "
                                               "restarting all ranks together from the last checkpoint", active=0),
                         pods=[], now=datetime(2026, 11, 27, 12, 31, tzinfo=timezone.utc), previous=None,
                         job_name="bot")
    assert status["phase"] == "Pending"
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["reason"] == "Regrouping" and "restarting all ranks together" in status["message"]


def test_a_regroup_leaves_the_job_suspended_when_the_spec_says_suspend():
    # The user set spec.suspend while the ranks were stopping: the regroup ends, and the Job stays suspended.
    suspended = job(suspend=True, annotation="rank 1 stopped", active=0)
    stopping = rank(0, deleting="2026-11-27T12:32:00Z")
    assert regroup.next_step(suspended, [stopping], suspend=True) is None  # still stopping
    assert regroup.next_step(suspended, [PREEMPTED_LATER], suspend=True) == {
        "metadata": {"annotations": {regroup.ANNOTATION: None}}}
