"""Keeps each `QLoRAFinetune`'s status current: what the watches saw, through `status_from`, patched if changed.

The single writer of the status fields `status.OWNED_FIELDS`: every write goes through `Reporter.refresh`
under a per-resource lock, so the last status written is known and each transition gives exactly one Event.
A name may be reused (delete, then create again): everything remembered of a run belongs to its uid, and a
status write carries the resourceVersion it was computed from, so that it never lands on a newer object.
Bursts of Job and pod events are coalesced into one refresh. Issue 6's metrics join through `enrich`: a
function `(body, status, now) -> status` applied after `status_from`, whose extra fields (`enrich_fields`)
are patched the same way; fields nobody here owns are never touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from qlora_operator import builders
from qlora_operator.api import Phase
from qlora_operator.checks import parse_spec
from qlora_operator.kube import ApiError, Kube
from qlora_operator.opmetrics import OperatorMetrics
from qlora_operator.settings import Settings
from qlora_operator.status import (
    FINISHED_PHASES,
    OWNED_FIELDS,
    Check,
    started_pods,
    status_from,
    status_patch,
    transition,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, QLoRAFinetune name)
Enrich = Callable[[Mapping[str, Any], dict[str, Any], datetime], dict[str, Any]]

# A short pause before a refresh, so that the burst of events of one change is read as one.
COALESCE_SECONDS = 0.05
RETRY_SECONDS = (1, 2, 5, 10, 30)
# After a write refused for an outdated resourceVersion: time for the watch to bring the newer object.
CONFLICT_RETRY_SECONDS = 0.5


def key_of(obj: Mapping[str, Any]) -> Key | None:
    """The resource a child (Job, pod) belongs to, from the annotation (full name) or the label."""
    meta = obj.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(builders.ANNOTATION_FINETUNE) or \
        (meta.get("labels") or {}).get(builders.LABEL_FINETUNE)
    return (meta.get("namespace"), name) if name else None


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return ref.get("uid")
    return None


def _pick(mapping: Mapping[str, Any] | None, *keys: str) -> dict[str, Any]:
    return {k: mapping[k] for k in keys if mapping and mapping.get(k) is not None}


# What the status needs of each kind, and nothing more: 200 runs' pods stay small in memory.
def trim_job(job: Mapping[str, Any]) -> dict[str, Any]:
    spec = job.get("spec") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return {
        "metadata": _pick(job.get("metadata"), "name", "namespace", "uid", "creationTimestamp", "labels",
                          "annotations", "ownerReferences", "deletionTimestamp", "resourceVersion"),
        "spec": _pick(spec, "suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "backoffLimit",
                      "completionMode", "completions")
        | {"template": {"spec": {"containers": [_pick(containers[0], "image")]}}},
        "status": dict(job.get("status") or {}),
    }


def trim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    containers = (pod.get("spec") or {}).get("containers") or ()
    return {
        "metadata": _pick(pod.get("metadata"), "name", "namespace", "uid", "creationTimestamp", "labels",
                          "annotations", "ownerReferences", "deletionTimestamp"),
        # The memory limit that an OOM kill names.
        "spec": {"containers": [_pick(c, "name", "resources") for c in containers]},
        "status": dict(pod.get("status") or {}),
    }


def trim_finetune(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": _pick(body.get("metadata"), "name", "namespace", "uid", "generation", "creationTimestamp",
                          "deletionTimestamp", "resourceVersion"),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def finished_job(job: Mapping[str, Any]) -> bool:
    """Whether the Job's conditions give the run's outcome (complete, or failed)."""
    return any(c.get("type") in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")
               and c.get("status") == "True" for c in (job.get("status") or {}).get("conditions") or ())


def uid_of(obj: Mapping[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("uid")


def parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


class Reporter:
    def __init__(self, kube: Kube, settings: Settings, metrics: OperatorMetrics | None = None,
                 enrich: Enrich | None = None, enrich_fields: Iterable[str] = ()):
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.enrich = enrich
        self.owned = tuple(OWNED_FIELDS) + tuple(enrich_fields)
        # The operator's view of the cluster, fed by kopf's watches.
        self.finetunes: dict[Key, dict[str, Any]] = {}
        self.jobs: dict[Key, dict[str, Any]] = {}
        self.pods: dict[Key, dict[str, dict[str, Any]]] = {}
        # The last body of a finished Job that was deleted (its TTL): the outcome it carried decides the run.
        self.ended_jobs: dict[Key, dict[str, Any]] = {}
        # Uids of the Jobs and pods the watches showed since a relist began (see `relist`).
        self._seen: set[str] = set()
        # The status as last written by us: fresher than any watch event about it.
        self.written: dict[Key, dict[str, Any]] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self._tasks: dict[Key, asyncio.Task] = {}
        self._dirty: set[Key] = set()
        self._specs: dict[Key, tuple] = {}
        # A spec check not written yet (its write met a conflict), with the (uid, generation) it is of.
        self._checks: dict[Key, tuple[tuple, Check]] = {}
        # Uids of the pods already counted in status.attempts.
        self.counted: dict[Key, set[str]] = {}

    # ----------------------------------------------------------------------------- the watches' view

    def saw_finetune(self, body: Mapping[str, Any], deleted: bool = False) -> Key:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        known = uid_of(self.finetunes.get(key))
        if deleted:
            if known in (None, uid_of(body)):  # an older object's late DELETED leaves its successor alone
                self.forget(key)
            return key
        if known is not None and known != uid_of(body):
            self._forget_run(key)  # the name now stands for another run: nothing of the old one carries over
        self.finetunes[key] = trim_finetune(body)
        return key

    def saw_job(self, body: Mapping[str, Any], deleted: bool = False) -> Key | None:
        key = key_of(body)
        if key is None:
            return None
        self._seen.add(uid_of(body))
        if deleted:
            if uid_of(self.jobs.get(key)) == uid_of(body):
                self.jobs.pop(key, None)
            known = uid_of(self.finetunes.get(key))
            if finished_job(body) and known is not None and controller_uid(body) == known:
                # Its last change and its deletion may come as this one event: keep what it says (for the run
                # it belongs to only; a deleted run's Job would be kept for the operator's lifetime).
                self.ended_jobs[key] = trim_job(body)
        else:
            self.jobs[key] = trim_job(body)
        return key

    def saw_answer(self, key: Key, job: Mapping[str, Any]) -> dict[str, Any]:
        """A Job as an API call answered (created, patched), trimmed; into the view only while the watch has
        shown nothing of it. Once it has, the view is the watch's: an event that came during the call (a newer
        change, the Job's deletion) is newer than the answer, and the answer's own change comes as an event."""
        trimmed = trim_job(job)
        if uid_of(trimmed) not in self._seen:
            self.jobs[key] = trimmed
        return trimmed

    def saw_pod(self, body: Mapping[str, Any], deleted: bool = False) -> Key | None:
        key = key_of(body)
        if key is None:
            return None
        self._seen.add(uid_of(body))
        pods = self.pods.setdefault(key, {})
        if deleted:
            if uid_of(pods.get(body["metadata"]["name"])) in (None, uid_of(body)):
                pods.pop(body["metadata"]["name"], None)
            if not pods:
                self.pods.pop(key, None)
        else:
            pods[body["metadata"]["name"]] = trim_pod(body)
        return key

    def forget(self, key: Key) -> None:
        self.finetunes.pop(key, None)
        for store in (self.jobs, self.pods, self._locks):
            store.pop(key, None)
        self._forget_run(key)
        self._dirty.discard(key)

    def _forget_run(self, key: Key) -> None:
        """Drop what was remembered of the run under `key` (its status, counts, spec, finished Job)."""
        for store in (self.written, self._specs, self.counted, self.ended_jobs, self._checks):
            store.pop(key, None)

    async def relist(self, namespaces: Iterable[str | None]) -> None:
        """Make the view of Jobs and pods what the API server lists now, in `namespaces` (None: all).

        At start this primes the view. Later it is how the view recovers from a watch that lost its place (a
        410 Gone: the re-list sends no DELETED for what was removed meanwhile). What the watches showed while
        the lists were read is newer than the lists and stays as the watches left it.
        """
        self._seen = set()
        jobs: list[dict[str, Any]] = []
        pods: list[dict[str, Any]] = []
        for namespace in namespaces:
            jobs += await self.kube.list("Job", namespace, builders.LABEL_FINETUNE)
            pods += await self.kube.list("Pod", namespace, builders.LABEL_FINETUNE)
        changed: set[Key] = set()
        listed = {uid_of(o) for o in jobs + pods}
        for key, job in list(self.jobs.items()):
            if uid_of(job) not in listed and uid_of(job) not in self._seen:
                del self.jobs[key]
                changed.add(key)
        for key, by_name in list(self.pods.items()):
            for name, pod in list(by_name.items()):
                if uid_of(pod) not in listed and uid_of(pod) not in self._seen:
                    del by_name[name]
                    changed.add(key)
            if not by_name:
                del self.pods[key]
        for job in jobs:
            key = key_of(job)
            if key is not None and uid_of(job) not in self._seen and uid_of(self.jobs.get(key)) != uid_of(job):
                changed.add(self.saw_job(job))
        for pod in pods:
            key = key_of(pod)
            if key is not None and uid_of(pod) not in self._seen and \
                    uid_of((self.pods.get(key) or {}).get(pod["metadata"]["name"])) != uid_of(pod):
                changed.add(self.saw_pod(pod))
        for key in changed:
            if key in self.finetunes:
                self.poke(key)

    def phases(self) -> dict[Key, str]:
        """Each known resource's phase (for the operator's metrics)."""
        out = {}
        for key, body in list(self.finetunes.items()):
            phase = (self.written.get(key) or body.get("status") or {}).get("phase")
            out[key] = phase or Phase.PENDING.value
        return out

    def job_of(self, key: Key, uid: str) -> dict[str, Any] | None:
        job = self.jobs.get(key)
        return job if job is not None and controller_uid(job) == uid else None

    def current_job(self, key: Key) -> dict[str, Any] | None:
        """The Job of the resource now under `key`: the live one, else the last body of its finished Job."""
        uid = uid_of(self.finetunes.get(key))
        if uid is None:
            return None
        ended = self.ended_jobs.get(key)
        return self.job_of(key, uid) or (ended if ended is not None and controller_uid(ended) == uid else None)

    def current_pods(self, key: Key) -> list[dict[str, Any]]:
        """The pods of the current Job only: a deleted run's pods, still terminating under the same name,
        belong to another Job."""
        job_uid = uid_of(self.current_job(key))
        if job_uid is None:
            return []
        return [p for p in (self.pods.get(key) or {}).values() if controller_uid(p) == job_uid]

    def spec_of(self, key: Key, body: Mapping[str, Any]):
        """(typed spec or None, check) of `body`, parsed once per generation of a run (a spec of 500
        inline records is not free)."""
        generation = (body["metadata"].get("uid"), body["metadata"].get("generation"))
        cached = self._specs.get(key)
        if cached is None or cached[0] != generation:
            cached = self._specs[key] = (generation, *parse_spec(dict(body.get("spec") or {})))
        return cached[1], cached[2]

    # ---------------------------------------------------------------------------------- refreshing

    def poke(self, key: Key) -> None:
        """Refresh `key` soon; many pokes in a burst make one refresh."""
        self._dirty.add(key)
        if key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(self._drain(key))

    async def _drain(self, key: Key) -> None:
        failures = 0
        try:
            while key in self._dirty:
                await asyncio.sleep(COALESCE_SECONDS)
                self._dirty.discard(key)
                try:
                    await self.refresh(key)
                    failures = 0
                except Exception as err:  # noqa: BLE001 -- logged, counted and retried; never kills the loop
                    reason = f"http{err.status}" if isinstance(err, ApiError) else type(err).__name__
                    if self.metrics:
                        self.metrics.errors.labels("status", reason).inc()
                    log.warning("status of %s/%s not refreshed: %s", key[0], key[1], err)
                    if failures < len(RETRY_SECONDS) and key in self.finetunes:
                        await asyncio.sleep(RETRY_SECONDS[failures])
                        failures += 1
                        self._dirty.add(key)
        finally:
            self._tasks.pop(key, None)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _lock(self, key: Key) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def refresh(self, key: Key, check: Check | None = None) -> dict[str, Any] | None:
        """Recompute the status of `key` and patch what changed; `check` is a fresh spec check, if any.

        Returns the status as now written (None when the resource is gone).
        """
        async with self._lock(key):
            body = self.finetunes.get(key)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            if self.metrics:
                self.metrics.reconciles.labels("status").inc()
            namespace, name = key
            uid = body["metadata"]["uid"]
            raw_spec = body.get("spec") or {}
            spec, parsed = self.spec_of(key, body)
            # A check stays pending until a refresh writes with it: the retry after a conflict knows it too.
            generation = (uid, body["metadata"].get("generation"))
            if check is not None:
                self._checks[key] = (generation, check)
            elif (self._checks.get(key) or (None,))[0] == generation:
                check = self._checks[key][1]
            if spec is None and check is None:
                check = parsed
            current = self.written.get(key)
            if current is None:
                current = body.get("status") or {}
            job = self.current_job(key)
            if job is None and current.get("jobName") and current.get("phase") not in FINISHED_PHASES:
                # The watch may not have shown it yet (just created, operator just started): ask. A finished
                # run's Job is gone for good (its TTL): asking every resync would cost a GET a minute a run.
                fetched = await self.kube.get("Job", namespace, builders.job_name(name))
                if fetched is not None and controller_uid(fetched) == uid and uid_of(self.finetunes.get(key)) == uid:
                    job = self.jobs[key] = trim_job(fetched)
            pods = self.current_pods(key) if job is not None else []
            create_failure = await self._create_failure(job, pods)
            now = datetime.now(timezone.utc)
            desired = status_from(
                generation=body["metadata"].get("generation"),
                job=job,
                pods=pods,
                now=now,
                previous=current,
                check=check,
                model=builders.resolved_model(spec, self.settings) if spec else None,
                job_name=builders.job_name(name),
                backoff_limit=spec.runtime.backoff_limit if spec else 3,
                queue_name=spec.runtime.queue_name if spec else None,
                suspend=bool(raw_spec.get("suspend")),
                output_path=output_uri(spec) if spec else None,
                counted_pods=self.counted.get(key),
                create_failure=create_failure,
            )
            if self.enrich is not None:
                desired = self.enrich(body, desired, now)
            patch = status_patch(current, desired, self.owned)
            counted = self.counted.get(key, set()) | started_pods(pods)
            if not patch:
                if self.finetunes.get(key) is body:  # not replaced by another run meanwhile
                    self.counted[key] = counted
                    self._checks.pop(key, None)
                return current
            try:
                # Computed from this object: refused (409) if the name now stands for another, or it changed.
                answer = await self.kube.patch_status(namespace, name, patch,
                                                      resource_version=body["metadata"].get("resourceVersion"))
            except ApiError as err:
                if err.not_found:
                    return None
                if err.conflict:
                    # The watch brings the newer object; the refresh is made again from it.
                    asyncio.get_running_loop().call_later(CONFLICT_RETRY_SECONDS, self.poke, key)
                    return None
                raise
            if uid_of(answer) == uid and self.finetunes.get(key) is body:
                body["metadata"]["resourceVersion"] = (answer.get("metadata") or {}).get("resourceVersion")
            written = {k: v for k, v in {**current, **patch}.items() if v is not None}
            self.written[key] = written
            if self.finetunes.get(key) is body:
                self._checks.pop(key, None)
            self.counted[key] = counted
            self._observe(body, current, written, now)
            event = transition(current, written)
            if event is not None:
                try:
                    await self.kube.post_event(body, event.type, event.reason, event.message)
                except ApiError as err:  # an Event is worth a log line, not a failed reconcile
                    log.warning("event for %s/%s not posted: %s", namespace, name, err)
            return written

    async def _create_failure(self, job: Mapping[str, Any] | None, pods: list[dict[str, Any]]) -> str | None:
        """The message of the Job's latest `FailedCreate` Event (a quota, a policy or a webhook refuses the
        pod) while no pod of it waits or runs; read only then, so a running run costs no call. An Event older
        than the newest pod is about a pod that was created after all."""
        if job is None or finished_job(job) or (job.get("spec") or {}).get("suspend") or \
                any((p.get("status") or {}).get("phase") not in ("Failed", "Succeeded") for p in pods):
            return None
        meta = job["metadata"]
        events = await self.kube.job_events(meta["namespace"], meta["name"], meta.get("uid"), "FailedCreate")
        newest_pod = max(((p.get("metadata") or {}).get("creationTimestamp") or "" for p in pods), default="")
        when = (lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        latest = max((e for e in events if when(e) >= newest_pod), key=when, default=None)
        return (latest or {}).get("message") or None

    def _observe(self, body: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any],
                 now: datetime) -> None:
        created = parse_time(body["metadata"].get("creationTimestamp"))
        if self.metrics and created and after.get("phase") == Phase.RUNNING.value and not before.get("startTime"):
            self.metrics.running.observe(max(0.0, (now - created).total_seconds()))


def output_uri(spec) -> str:
    """Where the adapter is, as `pvc://<claim>/<path>` (the form KServe's storageUri takes)."""
    pvc = spec.output.pvc
    return f"pvc://{pvc.claim_name}/{pvc.path}" if pvc.path else f"pvc://{pvc.claim_name}"
