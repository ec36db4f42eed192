"""A multi-node run restarts as a group: its ranks meet once, at start, in torchrun's static rendezvous.

When one rank's pod ends mid-run (a preemption the Job ignores, or a counted failure), the Job controller
replaces that rank alone, and the others wait in the old rendezvous for a peer that never comes back, holding
every GPU until the collective timeout (about 30 minutes). So the operator restarts the whole group: it
suspends the Job (the Job controller stops every pod, each trainer saves a checkpoint on SIGTERM, none counts
as a failure), and once no pod is left it resumes the Job, whose ranks then start and meet together, from
the last checkpoint. The Job carries the annotation `qlora.io/regroup` (why) in between.

Pure: `next_step(job, pods, suspend)` says what to patch on the Job, if anything; the handlers patch it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qlora_operator.builders import ANNOTATION_REGROUP as ANNOTATION
from qlora_operator.builders import LABEL_KUEUE_QUEUE
from qlora_operator.reporter import finished_job
from qlora_operator.status import completion_index, pod_finished_at, started_at


def _ended_at(pod: Mapping[str, Any]) -> str | None:
    """When a pod stopped being part of its group: its containers' end once Failed, else when its deletion
    was asked for (a preemption or an eviction in progress); None while it is part of it."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if status.get("phase") == "Failed":
        return pod_finished_at(pod) or meta.get("deletionTimestamp") or meta.get("creationTimestamp") or ""
    return meta.get("deletionTimestamp")


def _waiting_alone(pod: Mapping[str, Any]) -> bool:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return status.get("phase") == "Running" and not meta.get("deletionTimestamp") and bool(started_at(pod))


def stranded(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the ranks of `job` must restart together (one line), or None: a rank that runs started before a
    peer of another rank left the group."""
    spec = job.get("spec") or {}
    if spec.get("completionMode") != "Indexed" or int(spec.get("completions") or 1) < 2:
        return None
    for pod in pods:
        if not _waiting_alone(pod):
            continue
        started = started_at(pod)
        for peer in pods:
            ended = _ended_at(peer)
            if completion_index(peer) != completion_index(pod) and ended and ended > started:
                return (f"rank {completion_index(peer)} stopped while rank {completion_index(pod)} ran; restarting "
                        "all ranks together from the last checkpoint")
    return None


def next_step(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]],
              suspend: bool = False) -> dict[str, Any] | None:
    """The merge patch of the Job for the next step of a regroup, or None.

    Suspend it (annotated with why) when its ranks are stranded; resume it (annotation removed) once a
    regrouping Job has no pod left that runs or is stopping, unless the resource's spec says `suspend`
    (set during the regroup): then the regroup only ends, and the Job stays suspended. A Job of a Kueue queue
    is left to Kueue, which owns its `suspend`; a finished Job, or one suspended by the user, is left alone.
    """
    meta, spec = job.get("metadata") or {}, job.get("spec") or {}
    if finished_job(job) or LABEL_KUEUE_QUEUE in (meta.get("labels") or {}):
        return None
    if (meta.get("annotations") or {}).get(ANNOTATION):
        stopping = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Failed", "Succeeded")]
        if spec.get("suspend") and not stopping and not (job.get("status") or {}).get("active"):
            end = {"metadata": {"annotations": {ANNOTATION: None}}}
            return end if suspend else end | {"spec": {"suspend": False}}
        return None
    if spec.get("suspend"):
        return None
    why = stranded(job, pods)
    if why is None:
        return None
    return {"metadata": {"annotations": {ANNOTATION: why}}, "spec": {"suspend": True}}

