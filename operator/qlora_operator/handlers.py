"""kopf handlers, kept thin: validate, build, apply, report.

A `QLoRAFinetune` created, resumed (operator start) or changed goes through `reconcile`: its spec is checked,
its children built by `builders` and created idempotently (an existing Job of ours is adopted, never doubled),
the Job's mutable fields kept in step with the spec, and the status reported through the `Reporter`. Watches
on Jobs and pods labelled `qlora.io/finetune` feed the reporter's view and trigger status refreshes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import kopf

from qlora_operator import builders, regroup
from qlora_operator.api import GROUP, PLURAL, VERSION, QLoRAFinetuneSpec, Reason
from qlora_operator.checks import check_references, parse_spec
from qlora_operator.kube import ApiError, Kube
from qlora_operator.opmetrics import OperatorMetrics
from qlora_operator.reporter import Key, Reporter, controller_uid, finished_job, parse_time
from qlora_operator.settings import Settings
from qlora_operator.status import VALID, Check

log = logging.getLogger(__name__)

PREFIX = GROUP  # kopf's own annotations: qlora.io/<handler>, qlora.io/last-handled-configuration
# Every so often every run's status is recomputed, in case a watch event was missed.
RESYNC_SECONDS = 60.0
# Every so many resyncs, the Jobs and pods are listed afresh: a watch that lost its place (410 Gone) re-lists
# without a DELETED event for what was removed meanwhile.
RELIST_EVERY = 5
# The children the operator watches, as (group, version, plural); only those labelled qlora.io/finetune.
CHILD_WATCHES = (("batch", "v1", "jobs"), ("", "v1", "pods"))


@dataclass
class Operator:
    """What the handlers share (kopf's memo carries it)."""

    settings: Settings
    kube: Kube
    reporter: Reporter
    metrics: OperatorMetrics


class EssenceDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled configuration, without the inline dataset records.

    Up to 500 records would not fit the 256 KiB that all of an object's annotations may take; their digest
    does, and a change of them still shows as a change of `spec.dataset.inline`.
    """

    def build(self, *, body, extra_fields=None):
        essence = super().build(body=body, extra_fields=extra_fields)
        inline = ((essence.get("spec") or {}).get("dataset") or {}).get("inline")
        if inline is not None:
            essence["spec"]["dataset"]["inline"] = builders._hash(repr(inline), 16)
        return essence


def backoff(retry: int) -> float:
    """Seconds before checking a missing Secret, ConfigMap or PVC again: 5, 10, 20, 40, then every 60."""
    return float(min(5 * 2 ** retry, 60))


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's settings: bookkeeping under qlora.io, no peering, no cluster scanning (fewer RBAC rules)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = EssenceDiffBase(prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{PREFIX}/finalizer"  # unused: no handler needs one
    settings.peering.standalone = True
    # Resources and namespaces are the ones known at start: no list/watch of CRDs and namespaces needed.
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING
    # The watches of Jobs and pods ask the API server for ours only: a `labels=` filter of a handler is applied
    # on the client, after every Job and pod of the cluster came over the wire.
    for group, version, plural in CHILD_WATCHES:
        settings.watching.label_selectors[group, version, plural] = builders.LABEL_FINETUNE
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.queueing.error_delays = (1, 2, 5, 10, 30)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings)
    op: Operator = memo.operator
    memo.resync = asyncio.get_running_loop().create_task(_resync(op))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    op: Operator = memo.operator
    memo.resync.cancel()
    await op.reporter.close()
    await op.kube.close()


async def _resync(op: Operator) -> None:
    reporter = op.reporter
    for round_ in itertools.count(1):
        await asyncio.sleep(RESYNC_SECONDS)
        try:
            if round_ % RELIST_EVERY == 0:
                await reporter.relist(op.settings.watch_namespaces or (None,))
        except Exception as err:  # noqa: BLE001 -- the next round tries again; one failure must not end the loop
            log.warning("relisting Jobs and pods failed: %s: %s", type(err).__name__, err)
        for key in list(reporter.finetunes):
            reporter.poke(key)


# ------------------------------------------------------------------------------------ the watches

# Async (not sync) handlers: kopf runs sync ones in threads, and these feed state owned by the event loop.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetune_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.operator.reporter.saw_finetune(body, deleted=type == "DELETED")


@kopf.on.event(*CHILD_WATCHES[0], labels={builders.LABEL_FINETUNE: kopf.PRESENT})
async def job_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _regroup(memo.operator, _child_event(memo.operator.reporter, memo.operator.reporter.saw_job, type, body))


@kopf.on.event(*CHILD_WATCHES[1], labels={builders.LABEL_FINETUNE: kopf.PRESENT})
async def pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _regroup(memo.operator, _child_event(memo.operator.reporter, memo.operator.reporter.saw_pod, type, body))


def _child_event(reporter: Reporter, saw, type: str | None, body: kopf.Body) -> Key | None:
    key = saw(body, deleted=type == "DELETED")
    if key is not None and key in reporter.finetunes:
        reporter.poke(key)
        return key
    return None


async def _regroup(op: Operator, key: Key | None) -> None:
    """Restart a multi-node run's ranks together when one was replaced alone (regroup.py)."""
    body = op.reporter.finetunes.get(key) if key else None
    job = op.reporter.job_of(key, body["metadata"]["uid"]) if body else None
    suspend = bool((body.get("spec") or {}).get("suspend")) if body else False
    patch = regroup.next_step(job, op.reporter.current_pods(key), suspend) if job else None
    if patch is None:
        return
    meta = job["metadata"]
    try:
        updated = await op.kube.patch("Job", meta["namespace"], meta["name"], patch)
    except ApiError as err:  # the next event of the Job or its pods tries again
        log.warning("regrouping Job %s/%s: %s", meta["namespace"], meta["name"], err)
        return
    op.reporter.saw_answer(key, updated)
    log.info("Job %s/%s: %s", meta["namespace"], meta["name"], patch)


# --------------------------------------------------------------------------------- the reconcile

@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    op: Operator = memo.operator
    key = op.reporter.saw_finetune(body)
    op.metrics.reconciles.labels("spec").inc()
    try:
        await _reconcile(op, key, body, retry)
    except ApiError as err:
        op.metrics.errors.labels("spec", f"http{err.status}").inc()
        if err.status == 422 or err.status == 400:
            # The API server refused a child built from this spec (a bad affinity, say): only a spec change helps.
            await op.reporter.refresh(key, check=Check(False, Reason.INVALID_SPEC.value, err.message, terminal=True))
            raise kopf.PermanentError(err.message) from None
        raise kopf.TemporaryError(str(err), delay=2 if err.transient else 30) from None


async def _reconcile(op: Operator, key: Key, body: kopf.Body, retry: int) -> None:
    owner = builders.Owner.of(body)
    spec, check = parse_spec(dict(body.get("spec") or {}))
    if spec is None:
        await op.reporter.refresh(key, check=check)
        raise kopf.PermanentError(check.message)
    # The watches' view (primed at start) knows our Job; a Job it has not seen yet is adopted on create (409).
    job = op.reporter.job_of(key, owner.uid)
    created_before = (body.get("status") or {}).get("jobName") or (op.reporter.written.get(key) or {}).get("jobName")
    if job is None and created_before:
        await op.reporter.refresh(key)  # asks the API server for the Job the watch has not shown
        job = op.reporter.job_of(key, owner.uid)
        if job is None:
            return  # created once and gone since (a finished run's TTL, or deleted by hand): never run twice
    elif job is None:
        check = await check_references(spec, owner.namespace, op.kube.get)
        if not check.ok:
            await op.reporter.refresh(key, check=check)
            raise kopf.TemporaryError(check.message, delay=backoff(retry))
        job = await _create_children(op, key, owner, spec)
    await _sync_job(op, key, job, spec)
    await op.reporter.refresh(key, check=VALID)


def _check_ours(obj: dict[str, Any], owner: builders.Owner) -> None:
    if controller_uid(obj) != owner.uid:
        meta = obj["metadata"]
        raise kopf.TemporaryError(
            f"{obj.get('kind')} {meta['name']} exists and does not belong to this QLoRAFinetune (an earlier one "
            "of the same name still being deleted, or someone else's); waiting", delay=10)


async def _create_children(op: Operator, key: Key, owner: builders.Owner, spec: QLoRAFinetuneSpec) -> dict:
    """Create the ConfigMap (and Service), then the Job; what exists already and is ours is adopted."""
    job: dict[str, Any] = {}
    for child in builders.build_children(owner, spec, op.settings):
        kind, meta = child["kind"], child["metadata"]
        try:
            made = await op.kube.create(child)
        except ApiError as err:
            if not err.conflict:
                raise
            made = await op.kube.get(kind, meta["namespace"], meta["name"])
            if made is None:
                raise kopf.TemporaryError(f"{kind} {meta['name']} was deleted while adopting it", delay=1) from None
            _check_ours(made, owner)
            if kind == "ConfigMap" and made.get("data") != child["data"]:
                # The spec changed before the Job was created: the config follows it.
                made = await op.kube.patch(kind, meta["namespace"], meta["name"], {"data": child["data"]})
        else:
            if kind == "Job":
                created = parse_time(op.reporter.finetunes[key]["metadata"].get("creationTimestamp"))
                if created:
                    op.metrics.job_created.observe(
                        max(0.0, (datetime.now(timezone.utc) - created).total_seconds()))
                log.info("created Job %s/%s", meta["namespace"], meta["name"])
        if kind == "Job":
            job = op.reporter.saw_answer(key, made)
    return job


async def _sync_job(op: Operator, key: Key, job: dict[str, Any], spec: QLoRAFinetuneSpec) -> None:
    """Keep the Job's mutable fields (suspend, deadline, TTL) as the spec says."""
    current = job.get("spec") or {}
    patch: dict[str, Any] = {}
    if spec.suspend and not current.get("suspend"):
        patch["suspend"] = True
    elif not spec.suspend and current.get("suspend") and not spec.runtime.queue_name and \
            regroup.ANNOTATION not in ((job.get("metadata") or {}).get("annotations") or {}):
        # With a Kueue queue, unsuspending is Kueue's decision (it admits the Job); a regroup resumes by itself.
        patch["suspend"] = False
    for field, value in builders.mutable_job_fields(spec).items():
        if current.get(field) != value:
            patch[field] = value
    if (job.get("status") or {}).get("completionTime") or finished_job(job):
        patch.pop("suspend", None)
        patch.pop("activeDeadlineSeconds", None)
    if patch:
        meta = job["metadata"]
        updated = await op.kube.patch("Job", meta["namespace"], meta["name"], {"spec": patch})
        op.reporter.saw_answer(key, updated)
        log.info("Job %s/%s: %s", meta["namespace"], meta["name"], patch)
