"""The one place that decides a `QLoRAFinetune`'s status from what the cluster shows: its Job and pods.

Pure: `status_from(...)` maps (spec check, generation, Job, pods, now, previous status) to the status fields
this module owns (OWNED_FIELDS); the handlers patch only what changed, and leave the fields of others (the
trainer's metrics: progress, loss, ...) alone. Decisions are small functions returning a `Verdict` (phase,
reason, message), in the manner of cert-manager, which map straight onto conditions and Events.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from qlora_trainer.contract import FailureReason, reason_for_exit_code

from qlora_operator.api import ConditionType, Phase, Reason
from qlora_operator.builders import ANNOTATION_REGROUP
from qlora_operator.trainer_metrics import final_failure, read_termination_summary

# Status fields decided here; everything else in status belongs to someone else and is never touched.
OWNED_FIELDS = (
    "phase", "conditions", "observedGeneration", "jobName", "model", "startTime", "completionTime",
    "attempts", "outputPath", "message",
)
TERMINAL_PHASES = (Phase.SUCCEEDED.value, Phase.FAILED.value)
# Nothing more will happen to a run in these phases: its status stands, and its Job is not looked for.
FINISHED_PHASES = (*TERMINAL_PHASES, Phase.UNKNOWN.value)
# Reasons worth a Warning event (the rest are Normal).
WARNING_REASONS = {r.value for r in Reason} | {r.value for r in FailureReason} | {
    "JobGone", "Killed", "ContainerConfigError", "JobFailed", "QuotaExceeded", "PodCreateRefused"}
# The DisruptionTarget condition's reasons, as a person says them.
DISRUPTIONS = {
    "PreemptionByScheduler": "preempted by a higher-priority pod",
    "EvictionByEvictionAPI": "evicted (node drain or eviction API)",
    "DeletionByTaintManager": "evicted by a taint of its node",
    "DeletionByPodGC": "deleted with its lost node",
    "TerminationByKubelet": "stopped by the kubelet (node shutdown or resource pressure)",
}
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                      "RegistryUnavailable", "SignatureValidationFailed"}
MESSAGE_LIMIT = 1000
# The kubelet's words for a Secret, or a key of one, that a container's environment names and that is missing.
_MISSING_SECRET = re.compile(r'secret "[^"]*" not found|couldn\'t find key \S+ in Secret', re.IGNORECASE)
# A hub token that found its way into a log line (FallbackToLogsOnError) never reaches status or an Event.
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")


@dataclass(frozen=True)
class Check:
    """The outcome of the operator's checks of a spec: valid, or why not (a condition reason and message).

    `terminal`: no retry can help without a spec change (the run fails); otherwise the check is repeated
    with backoff and the run waits (`Pending`), e.g. for a Secret created afterwards.
    """

    ok: bool
    reason: str = "Valid"
    message: str = ""
    terminal: bool = False


VALID = Check(ok=True, reason="Valid", message="spec and the objects it names are valid")


@dataclass(frozen=True)
class Verdict:
    """Where a run stands: a phase, the reason in one CamelCase word, and one line for a person."""

    phase: str
    reason: str
    message: str


# --------------------------------------------------------------------------------------- small helpers

def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line, without credentials, at most `limit` characters."""
    line = _TOKEN.sub("hf_***", " ".join(str(text).split()))
    return line if len(line) <= limit else line[: limit - 3] + "..."


def camel_word(reason: str) -> str:
    """`reason` as one CamelCase word, as conditions require (a kubelet's or a trainer's may not be)."""
    word = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", reason or "") if part)
    return word if word[:1].isalpha() else f"Reason{word}" if word else "Unknown"


def _conditions_by_type(status: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {c.get("type"): c for c in (status or {}).get("conditions") or ()}


def _job_condition(job: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    for wanted in types:
        for cond in (job.get("status") or {}).get("conditions") or ():
            if cond.get("type") == wanted and cond.get("status") == "True":
                return cond
    return None


def _container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return list(status.get("initContainerStatuses") or ()) + list(status.get("containerStatuses") or ())


def started_at(pod: Mapping[str, Any]) -> str | None:
    """When the pod's first container started, or None if none did."""
    times = []
    for cs in _container_statuses(pod):
        state = cs.get("state") or {}
        for key in ("running", "terminated"):
            started = (state.get(key) or {}).get("startedAt")
            if started:
                times.append(started)
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if last.get("startedAt"):
            times.append(last["startedAt"])
    return min(times) if times else None


def started_pods(pods: Sequence[Mapping[str, Any]]) -> set[str]:
    """Uids (else names) of the pods whose container started: the attempts they stand for."""
    meta = (lambda p: p.get("metadata") or {})
    return {meta(p).get("uid") or meta(p).get("name") for p in pods if started_at(p)}


def _pod_time(pod: Mapping[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def pod_finished_at(pod: Mapping[str, Any]) -> str:
    """When the pod's last container ended ("" while none has)."""
    ends = [((cs.get("state") or {}).get("terminated") or {}).get("finishedAt") or ""
            for cs in _container_statuses(pod)]
    return max(ends, default="")


def completion_index(pod: Mapping[str, Any]) -> str | None:
    """The rank of an Indexed Job's pod (its completion index), or None for a pod of a plain Job."""
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX)


def is_rank0(pod: Mapping[str, Any]) -> bool:
    return completion_index(pod) in (None, "0")


# ------------------------------------------------------------------------------- reading the pods

def disruption(pod: Mapping[str, Any]) -> str | None:
    """What stopped a pod that was taken away (preemption, eviction, a node drain, a deletion), in words; None
    when nothing did. Such a pod exits 143 after its SIGTERM checkpoint: no failure of the trainer, and one
    the Job's pod-failure policy does not count."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or ():
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            what = DISRUPTIONS.get(cond.get("reason"), "interrupted")
            return one_line(f"{what}: {cond['message']}" if cond.get("message") else what)
    if status.get("reason") == "Evicted":
        return one_line(f"evicted: {status['message']}" if status.get("message") else "evicted")
    if _stopped_by_sigterm(pod):
        return "stopped by a SIGTERM (its pod deleted, or its node shut down)"
    if (pod.get("metadata") or {}).get("deletionTimestamp") and status.get("phase") not in ("Failed", "Succeeded"):
        return "its pod is being deleted"
    return None


def _stopped_by_sigterm(pod: Mapping[str, Any]) -> bool:
    """The trainer saved a checkpoint on a SIGTERM and exited, as its termination summary says."""
    for cs in _container_statuses(pod):
        summary = read_termination_summary(((cs.get("state") or {}).get("terminated") or {}).get("message"))
        if summary and summary.get("status") == "Terminated":
            return True
    return False


def _checkpoint_step(pod: Mapping[str, Any]) -> int | None:
    """The step of the last checkpoint the pod's trainer saved, from its termination summary."""
    for cs in _container_statuses(pod):
        summary = read_termination_summary(((cs.get("state") or {}).get("terminated") or {}).get("message"))
        checkpoint = (summary or {}).get("lastCheckpoint")
        step = checkpoint.get("step") if isinstance(checkpoint, Mapping) else None
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            return step
    return None


def pod_failure(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a failed pod: the trainer's own words from its termination summary, its exit
    code mapped by the contract, OOMKilled, or what the kubelet said. None if it did not fail, or if it
    was disrupted (`disruption`), which is no failure of the run."""
    status = pod.get("status") or {}
    if status.get("phase") != "Failed" or disruption(pod):
        return None
    for cs in _container_statuses(pod):
        term = (cs.get("state") or {}).get("terminated")
        if not term or term.get("exitCode", 0) == 0:
            continue
        code = term.get("exitCode")
        if term.get("reason") == "OOMKilled":
            limit = _memory_limit(pod, cs.get("name"))
            return Reason.OOM_KILLED.value, (
                f"the trainer was killed for going over its memory limit{f' ({limit})' if limit else ''}; raise "
                "resources.memory, or lower training.batchSize or training.maxLength")
        summary = read_termination_summary(term.get("message"))
        said = final_failure(summary) if summary else None
        if said:
            return said[0], one_line(said[1])
        known = reason_for_exit_code(code) if isinstance(code, int) else None
        if known is None and summary is None and isinstance(code, int) and code > 128:
            # Killed by a signal before it could say anything: the last line of its log is no reason.
            return "Killed", f"the trainer was killed by {_signal_name(code - 128)} (exit code {code}) before it could say why"
        # A summary that names no failure is no message for a person: its JSON stays out.
        tail = "" if summary else _last_line(term.get("message"))
        if known is not None:
            return known.value, one_line(tail or f"the trainer exited with code {code} ({known.value})")
        return "Error", one_line(f"the trainer exited with code {code}" + (f": {tail}" if tail else ""))
    if status.get("reason") or status.get("message"):
        return status.get("reason") or "PodFailed", one_line(status.get("message") or status.get("reason"))
    return None


def _memory_limit(pod: Mapping[str, Any], container: str | None) -> str | None:
    for spec in (pod.get("spec") or {}).get("containers") or ():
        if spec.get("name") == container:
            return ((spec.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(message: str | None) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def pod_waiting_problem(pod: Mapping[str, Any], image: str | None) -> Verdict | None:
    """Why a pod that should run does not: the scheduler cannot place it, or its image cannot be pulled."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and \
                cond.get("reason") == "Unschedulable":
            return Verdict(Phase.PENDING.value, Reason.UNSCHEDULABLE.value, one_line(
                f"no node can run the trainer pod: {cond.get('message') or 'unschedulable'}; "
                "check resources.gpus, resources.gpuResourceName, nodeSelector and tolerations"))
    for cs in _container_statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in IMAGE_PULL_REASONS:
            what = cs.get("image") or image or "the trainer image"
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return Verdict(Phase.PENDING.value, Reason.IMAGE_PULL_ERROR.value, one_line(
                f"cannot pull image {what} ({reason}){detail}; check runtime.image and runtime.imagePullSecrets"))
        if reason == "CreateContainerConfigError":
            said = waiting.get("message") or reason
            if _MISSING_SECRET.search(said):
                # The kubelet reads the Secret as the pod's identity: the operator needs no access to Secrets.
                return Verdict(Phase.PENDING.value, Reason.SECRET_NOT_FOUND.value, one_line(
                    f"the trainer cannot start: {said}; create it (spec.model.tokenSecretRef, runtime.env), "
                    "and the run starts"))
            return Verdict(Phase.PENDING.value, "ContainerConfigError", one_line(
                f"the trainer container cannot start: {said}"))
    return None


def pod_create_problem(event_message: str) -> Verdict:
    """Why the Job controller cannot create the trainer pod, from its `FailedCreate` Event: a quota, a Pod
    Security level, a webhook. The run waits (`Pending`): a quota raised or a policy changed lets it start."""
    if "exceeded quota" in event_message:
        reason, hint = "QuotaExceeded", "raise the namespace's ResourceQuota, or wait for other pods to end"
    else:
        reason, hint = "PodCreateRefused", "the namespace's policy refuses the trainer pod; ask its administrator"
    return Verdict(Phase.PENDING.value, reason,
                   one_line(f"the trainer pod cannot be created ({event_message}); {hint}"))


def _interrupted(pods: Sequence[Mapping[str, Any]]) -> Verdict | None:
    """The run waits because Kubernetes took its newest trainer pod away (preemption, eviction, drain)."""
    gone = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"
            or (p.get("metadata") or {}).get("deletionTimestamp")]
    if not gone:
        return None
    newest = max(gone, key=lambda p: (_pod_time(p), pod_finished_at(p)))
    what = disruption(newest)
    if what is None:
        return None
    if (newest.get("status") or {}).get("phase") != "Failed":
        then = "the trainer is saving a checkpoint, then the run resumes from it"
    else:
        step = _checkpoint_step(newest)
        then = f"resuming from the checkpoint of step {step}" if step else "resuming from the last checkpoint"
    return Verdict(Phase.PENDING.value, "Interrupted", one_line(f"{what}; {then}"))


def _running(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    return status.get("phase") == "Running"


def _ranks_not_up(job: Mapping[str, Any], live: Sequence[Mapping[str, Any]], image: str | None) -> Verdict | None:
    """A multi-node run whose ranks are not all up (running, or done): the ones that run wait for the others
    at the rendezvous, so the run is not running yet. Says why a missing rank's pod does not run, if known."""
    spec = job.get("spec") or {}
    ranks = int(spec.get("completions") or 1) if spec.get("completionMode") == "Indexed" else 1
    if ranks < 2:
        return None
    up = {completion_index(p) for p in live if _running(p) or (p.get("status") or {}).get("phase") == "Succeeded"}
    missing = [str(rank) for rank in range(ranks) if str(rank) not in up]
    if not missing:
        return None
    wait = ("the other ranks wait for it at the rendezvous, for at most runtime.rendezvousTimeoutSeconds, then "
            "fail with RendezvousTimeout and are retried")
    for pod in sorted(live, key=_pod_time, reverse=True):
        problem = pod_waiting_problem(pod, image) if completion_index(pod) in missing else None
        if problem:
            return Verdict(problem.phase, problem.reason, one_line(
                f"rank {completion_index(pod)} of {ranks}: {problem.message}; {wait}"))
    return Verdict(Phase.PENDING.value, "Starting", one_line(
        f"rank {', '.join(missing)} of {ranks} not running yet; {wait}"))


# ---------------------------------------------------------------------------------------- decisions

_POLICY_POD = re.compile(r"\bfor pod ([^/\s]+)/([^\s]+)")


def deciding_failure(failed: Mapping[str, Any],
                     failing: Sequence[tuple[Mapping[str, Any], tuple[str, str]]]) -> tuple[str, str] | None:
    """The failure that explains a failed Job, of the (pod, pod_failure) pairs of its failed pods, whatever
    order the pods' events came in: the pod the Job's pod-failure policy names in its condition, else rank 0's
    (the others often fail because it did), else the one that ended last."""
    if not failing:
        return None
    named = _POLICY_POD.search(failed.get("message") or "") if failed.get("reason") == "PodFailurePolicy" else None
    if named:
        for pod, failure in failing:
            if (pod.get("metadata") or {}).get("name") == named.group(2):
                return failure
    _, failure = max(failing, key=lambda pf: (is_rank0(pf[0]), pod_finished_at(pf[0]), _pod_time(pf[0])))
    return failure


def verdict_of_failed_job(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]],
                          failed: Mapping[str, Any], backoff_limit: int) -> Verdict:
    job_reason = failed.get("reason") or "JobFailed"
    failing = [(p, f) for p, f in ((p, pod_failure(p)) for p in pods) if f]
    failures = [f for _, f in failing]
    last = deciding_failure(failed, failing)
    if job_reason == "DeadlineExceeded":
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return Verdict(Phase.FAILED.value, Reason.DEADLINE_EXCEEDED.value, one_line(
            f"the run took longer than runtime.activeDeadlineSeconds ({deadline}s) and was stopped; raise it, "
            "or lower training.epochs or training.maxSteps, and apply the resource under a new name"))
    if job_reason == "PodFailurePolicy" and last:
        return Verdict(Phase.FAILED.value, last[0], last[1])
    if job_reason == "BackoffLimitExceeded":
        tried = len(failures) or backoff_limit + 1
        if last and last[0] in (Reason.OOM_KILLED.value, Reason.CUDA_OUT_OF_MEMORY.value):
            return Verdict(Phase.FAILED.value, last[0], one_line(f"{last[1]} (failed {tried} times)"))
        detail = f"; last attempt: {last[0]}: {last[1]}" if last else ""
        return Verdict(Phase.FAILED.value, Reason.BACKOFF_LIMIT_EXCEEDED.value, one_line(
            f"the trainer failed {tried} times, more than runtime.backoffLimit ({backoff_limit}) allows{detail}"))
    reason = job_reason if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", job_reason) else "JobFailed"
    if last:
        return Verdict(Phase.FAILED.value, last[0], last[1])
    return Verdict(Phase.FAILED.value, reason, one_line(failed.get("message") or f"the Job failed ({reason})"))


def verdict_of_job(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], *, backoff_limit: int,
                   queue_name: str | None, spec_suspend: bool, output_path: str | None,
                   create_failure: str | None = None) -> Verdict:
    """Where a run with a Job stands, from the Job's conditions, its pods, and the message of the Job's
    latest `FailedCreate` Event (`create_failure`), if any."""
    name = (job.get("metadata") or {}).get("name")
    if _job_condition(job, "Complete", "SuccessCriteriaMet"):
        where = f"; the adapter is in {output_path}" if output_path else ""
        return Verdict(Phase.SUCCEEDED.value, "Succeeded", f"training finished{where}")
    failed = _job_condition(job, "Failed", "FailureTarget")
    if failed:
        return verdict_of_failed_job(job, pods, failed, backoff_limit)
    regrouping = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_REGROUP)
    if regrouping:
        # The operator suspended the Job to restart its ranks together (regroup.py): not the user's suspend.
        return Verdict(Phase.PENDING.value, "Regrouping", one_line(regrouping))
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    if (job.get("spec") or {}).get("suspend"):
        if queue_name and not spec_suspend:
            return Verdict(Phase.PENDING.value, "Queued",
                           f"waiting for Kueue to admit the Job from LocalQueue {queue_name}")
        return Verdict(Phase.SUSPENDED.value, "Suspended",
                       "suspended: pods are stopped and checkpoints kept; set spec.suspend to false to resume")
    image = ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers", [{}])[0].get("image")
    if any(_running(p) for p in live):
        return _ranks_not_up(job, live, image) or Verdict(
            Phase.RUNNING.value, "Running", f"the trainer is running (Job {name})")
    if any((p.get("status") or {}).get("phase") == "Succeeded" for p in live):
        # The trainer is done and the Job controller marks the Job Complete a moment later: still running.
        return Verdict(Phase.RUNNING.value, "Finishing", f"the trainer finished; Job {name} is completing")
    for pod in sorted(live, key=_pod_time, reverse=True):
        problem = pod_waiting_problem(pod, image)
        if problem:
            return problem
    if create_failure and all((p.get("status") or {}).get("phase") in ("Failed", "Succeeded") for p in live):
        return pod_create_problem(create_failure)
    interrupted = _interrupted(pods)
    if interrupted:
        return interrupted
    failures = [f for f in (pod_failure(p) for p in sorted(pods, key=_pod_time)) if f]
    if failures:
        reason, message = failures[-1]
        return Verdict(Phase.PENDING.value, "Retrying", one_line(
            f"attempt {len(failures)} failed ({reason}: {message}); retrying from the last checkpoint"))
    return Verdict(Phase.PENDING.value, "Starting", f"waiting for the trainer pod of Job {name} to start")


# -------------------------------------------------------------------------------------------- status

def condition(type_: str, status: str, reason: str, message: str, *, previous: Mapping[str, Any] | None,
              now: datetime, generation: int | None) -> dict[str, Any]:
    """A condition whose lastTransitionTime moves only when its status flips (API conventions)."""
    same = previous is not None and previous.get("status") == status and previous.get("lastTransitionTime")
    cond = {
        "type": type_,
        "status": status,
        "reason": camel_word(reason),
        "message": message,
        "lastTransitionTime": previous["lastTransitionTime"] if same else rfc3339(now),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def status_from(*, generation: int | None, job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]],
                now: datetime, previous: Mapping[str, Any] | None, check: Check | None = None,
                model: Mapping[str, str] | None = None, job_name: str | None = None,
                backoff_limit: int = 3, queue_name: str | None = None, suspend: bool = False,
                output_path: str | None = None, counted_pods: Collection[str] | None = None,
                create_failure: str | None = None) -> dict[str, Any]:
    """The owned status fields of a run.

    `check`: the outcome of the spec checks just made; None keeps what the previous status says (a refresh
    from a Job or pod event). `job`: None when no Job exists (not yet, or deleted after it finished).
    `output_path`: where the adapter lands (shown once Succeeded). `counted_pods`: uids of the pods already
    in `previous["attempts"]` (pods come and go: a suspended Job deletes its pod); None when not known (the
    operator just started), then the started pods seen now are taken as counted. `create_failure`: the
    message of the Job's latest `FailedCreate` Event. Other arguments come from the spec.
    """
    previous = previous or {}
    before = _conditions_by_type(previous)
    created = job is not None or bool(previous.get("jobName"))

    # SpecValid: this check, else what the last check said; a Job that exists was valid enough to create.
    if check is None:
        prev_valid = before.get(ConditionType.SPEC_VALID.value)
        if prev_valid is not None:
            check = Check(ok=prev_valid.get("status") == "True", reason=prev_valid.get("reason") or "Valid",
                          message=prev_valid.get("message") or "",
                          terminal=previous.get("phase") == Phase.FAILED.value)
        elif created:
            check = VALID

    if job is None and created and previous.get("phase") in FINISHED_PHASES:
        # The Job is gone after the run ended (ttlSecondsAfterFinished): the result stands as it was.
        return {k: previous[k] for k in OWNED_FIELDS if k in previous} | {"observedGeneration": generation}

    if job is not None:
        verdict = verdict_of_job(job, pods, backoff_limit=backoff_limit, queue_name=queue_name,
                                 spec_suspend=suspend, output_path=output_path, create_failure=create_failure)
    elif created:
        # Deleted by hand, or by its TTL while the operator was away: it may well have succeeded first.
        where = f" look for the adapter in {output_path};" if output_path else ""
        verdict = Verdict(Phase.UNKNOWN.value, "JobGone", one_line(
            f"the Job {previous.get('jobName') or job_name} is gone; its outcome is unknown;{where} apply the "
            "resource under a new name to run again"))
    elif check is not None and not check.ok:
        verdict = Verdict(Phase.FAILED.value if check.terminal else Phase.PENDING.value, check.reason,
                          one_line(check.message))
    else:
        verdict = Verdict(Phase.PENDING.value, "Creating", "creating the Job")

    phase = verdict.phase
    conditions = []

    def add(type_: ConditionType, status: str, reason: str, message: str) -> None:
        conditions.append(condition(type_.value, status, reason, one_line(message), previous=before.get(type_.value),
                                    now=now, generation=generation))

    if check is None:
        add(ConditionType.SPEC_VALID, "Unknown", "Checking", "checking the spec and the objects it names")
    else:
        add(ConditionType.SPEC_VALID, "True" if check.ok else "False", check.reason, check.message or check.reason)
    if created:
        add(ConditionType.JOB_CREATED, "True", "Created", f"Job {job_name or previous.get('jobName')} created")
    else:
        add(ConditionType.JOB_CREATED, "False", verdict.reason, verdict.message)
    if phase == Phase.RUNNING.value:
        add(ConditionType.RUNNING, "True", verdict.reason, verdict.message)
    else:
        add(ConditionType.RUNNING, "False", verdict.reason, verdict.message)
    if phase == Phase.SUCCEEDED.value:
        add(ConditionType.SUCCEEDED, "True", verdict.reason, verdict.message)
    elif phase == Phase.FAILED.value:
        add(ConditionType.SUCCEEDED, "False", verdict.reason, verdict.message)
    else:
        add(ConditionType.SUCCEEDED, "Unknown", verdict.reason, verdict.message)
    job_suspended = bool(job is not None and (job.get("spec") or {}).get("suspend")) and phase not in TERMINAL_PHASES
    if job_suspended:
        add(ConditionType.SUSPENDED, "True", verdict.reason, verdict.message)
    else:
        add(ConditionType.SUSPENDED, "False", "NotSuspended", "the run is not suspended")

    out: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "observedGeneration": generation,
        "message": verdict.message,
    }
    if created:
        out["jobName"] = job_name or previous.get("jobName")
    if model:
        out["model"] = dict(model)
    starts = [s for s in (started_at(p) for p in pods) if s]
    start = previous.get("startTime") or (min(starts) if starts else None)
    if start:
        out["startTime"] = start
    attempts = int(previous.get("attempts") or 0)
    started = started_pods(pods)
    if counted_pods is None:
        attempts = max(attempts, len(started))
    else:
        attempts += len(started - set(counted_pods))
    if attempts or created:
        out["attempts"] = attempts
    if phase in TERMINAL_PHASES:
        out["completionTime"] = previous.get("completionTime") or _finished_at(job) or rfc3339(now)
    if phase == Phase.SUCCEEDED.value and output_path:
        out["outputPath"] = output_path
    return {k: v for k, v in out.items() if v is not None}


def _finished_at(job: Mapping[str, Any] | None) -> str | None:
    if job is None:
        return None
    done = (job.get("status") or {}).get("completionTime")
    if done:
        return done
    cond = _job_condition(job, "Failed", "FailureTarget")
    return cond.get("lastTransitionTime") if cond else None


# --------------------------------------------------------------------------------- changes and events

def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any],
                 owned: Sequence[str] = OWNED_FIELDS) -> dict[str, Any]:
    """The merge patch that turns `current` into `desired` for the `owned` fields only; empty: no change.

    Fields outside `owned` (the trainer's metrics, written by others) are never in the patch.
    """
    current = current or {}
    patch = {k: v for k, v in desired.items() if k in owned and current.get(k) != v}
    patch.update({k: None for k in owned if k in current and k not in desired})
    return patch


@dataclass(frozen=True)
class Transition:
    """An Event to post: what changed, in the Succeeded condition's reason and the phase."""

    type: str  # Normal | Warning
    reason: str
    message: str


def transition(previous: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> Transition | None:
    """The Event for a change of phase or of the reason a run is where it is; None when neither changed."""
    def key(status: Mapping[str, Any] | None) -> tuple[Any, Any]:
        cond = _conditions_by_type(status).get(ConditionType.SUCCEEDED.value) or {}
        return (status or {}).get("phase"), cond.get("reason")

    if key(previous) == key(desired):
        return None
    phase, reason = key(desired)
    kind = "Warning" if reason in WARNING_REASONS else "Normal"
    return Transition(type=kind, reason=reason or phase or "Unknown",
                      message=one_line(f"{phase}: {desired.get('message') or reason}"))
