"""Feeds the trainer's metrics into each `QLoRAFinetune`'s status.

A loop reads the metrics of every running trainer pod (rank 0) every `scrape_interval` seconds, concurrently
and bounded (`MetricsReader`), and pokes the `Reporter` when what status would show changed. The reporter's
`enrich` hook then merges the metric fields into the status it computes: the last good reading, the final
values of the termination summary once the pod ended, the trainer's phase as the `Running` condition's
reason, and a note in `message` while the metrics are stale. Metric fields change at most every
`status_min_interval` seconds, except for the final values. The phase is never decided here.

    feed = MetricsFeed(settings)
    feed.attach(reporter)          # before the operator starts
    task = feed.start()            # in the running loop; `await feed.close()` on the way out
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from qlora_operator.api import ConditionType, Phase
from qlora_operator.reporter import Key, Reporter, output_uri, uid_of
from qlora_operator.settings import Settings
from qlora_operator.status import is_rank0
from qlora_operator.trainer_metrics import (
    METRIC_FIELDS,
    MetricsReader,
    MetricsTrack,
    MetricsUnreadable,
    attempt_note,
    changed,
    final_fields,
    metrics_status,
    observe,
    read_termination_summary,
    redact_url,
    running_reason,
    should_patch,
    stale_note,
    with_note,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------- reading the pods

def _created(pod: Mapping[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def _name(pod: Mapping[str, Any]) -> str | None:
    return (pod.get("metadata") or {}).get("name")


def trainer_pod(pods: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The running rank-0 trainer pod (the newest, if a retry overlaps its predecessor), or None."""
    running = [p for p in pods if is_rank0(p) and (p.get("status") or {}).get("phase") == "Running"
               and not (p.get("metadata") or {}).get("deletionTimestamp")]
    return max(running, key=_created) if running else None


def _termination_message(pod: Mapping[str, Any]) -> str | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated:
            return terminated.get("message") or ""
    return None


def ended_summary(pods: list[Mapping[str, Any]], values_pod: str | None = None) -> dict[str, Any] | None:
    """The termination summary of the newest rank-0 pod that ended and left one, unless the readings the feed
    holds (`values_pod`'s) come from a pod made after it: then a retry is under way and its values are newer.

    A retry that has not been read yet does not hide the summary: between attempts, the attempt that ended
    says best where the run stands (its last readings may be older than its SIGTERM checkpoint).
    """
    mine = [p for p in pods if is_rank0(p)]
    ended = [p for p in mine if _termination_message(p) is not None]
    if not ended:
        return None
    last = max(ended, key=_created)
    if values_pod is not None and any(_name(p) == values_pod and _created(p) > _created(last) for p in mine):
        return None
    return read_termination_summary(_termination_message(last))


def _checkpoint_base(reporter: Reporter, key: Key, body: Mapping[str, Any]) -> str | None:
    """Where the run's checkpoints are, from the spec the reporter parsed once for this generation."""
    spec, _ = reporter.spec_of(key, body)
    return output_uri(spec) if spec else None


def metric_fields(status: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: status[k] for k in METRIC_FIELDS if status and status.get(k) is not None}


# --------------------------------------------------------------------------------- the decisions

def merge_metrics(desired: dict[str, Any], previous: Mapping[str, Any], track: MetricsTrack | None,
                  summary: Mapping[str, Any] | None, output: str | None, now: datetime,
                  last_patch: datetime | None, min_interval: float,
                  shown_pod: str | None = None) -> tuple[dict[str, Any], bool]:
    """`desired` (status_from's status) with the metric fields, reason and note added; and whether the
    metric fields changed (the caller records the time and `track.values_pod`, for the rate limit).

    Values: the previous status's, then the last good reading over them, then the termination summary's
    final values over those; no ETA unless running. Only a running trainer's readings are rate limited, and
    only while they come from the pod whose values status shows (`shown_pod`): a retry's first values are
    written at once, so that status never shows one attempt's step beside the note of another.
    """
    old = metric_fields(previous)
    new = dict(old)
    if track is not None:
        new.update(metrics_status(track, now, output))
    if summary is not None:
        new.update(final_fields(summary, output))
    running = desired.get("phase") == Phase.RUNNING.value
    if not running or (track is not None and track.retry_pending):
        # Nothing is training (suspended, between attempts, ended), or a retry has not said where it goes on
        # from: the time left is not known.
        new.update(eta=None, estimatedCompletionTime=None)
    new = {k: v for k, v in new.items() if v is not None}
    same_attempt = track is None or (track.values_pod == shown_pod and not track.retry_pending)
    # Only the stream of readings of a running trainer is rate limited; the rest are rare transitions.
    if new != old and running and same_attempt and not should_patch(old, new, last_patch, now, min_interval):
        new = old
    out = {**desired, **new}

    if desired.get("phase") == Phase.RUNNING.value and track is not None:
        reason = running_reason(track.last_good)
        if reason:
            # The trainer's phase refines the plain "Running" reason only ("Finishing" says more than it).
            out["conditions"] = [
                {**c, "reason": reason} if c.get("type") == ConditionType.RUNNING.value and c.get("status") == "True"
                and c.get("reason") == "Running" else c
                for c in desired.get("conditions") or ()
            ]
        out["message"] = with_note(desired.get("message"), stale_note(track) or attempt_note(track))
    return out, new != old


# ------------------------------------------------------------------------------------------ the feed

class MetricsFeed:
    """The read loop and the reporter's `enrich` hook; per-run memory lives in `tracks`, by the resource's
    uid (a resource made again under the same name starts with nothing of its predecessor's)."""

    def __init__(self, settings: Settings, reader: MetricsReader | None = None):
        self.settings = settings
        self.reader = reader or MetricsReader(
            prometheus_url=settings.prometheus_url, timeout=min(5.0, max(1.0, settings.scrape_interval / 2)))
        self.reporter: Reporter | None = None
        self.tracks: dict[str, MetricsTrack] = {}
        self.last_patch: dict[str, datetime] = {}
        # The pod whose readings status shows: a reading from another (a retry) is not rate limited.
        self.shown_pod: dict[str, str] = {}
        self._task: asyncio.Task | None = None

    def attach(self, reporter: Reporter) -> None:
        """Make `reporter` merge the metrics into every status it writes."""
        self.reporter = reporter
        reporter.enrich = self.enrich
        reporter.owned = tuple(dict.fromkeys((*reporter.owned, *METRIC_FIELDS)))

    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.reader.close()

    async def run(self) -> None:
        url = self.reader.prometheus_url
        mode = f"Prometheus at {redact_url(url)}" if url else "the trainer pods"
        log.info("reading trainer metrics from %s every %gs", mode, self.settings.scrape_interval)
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 -- one bad tick must not end the feed
                log.exception("reading trainer metrics failed")
            await asyncio.sleep(self.settings.scrape_interval)

    async def tick(self) -> None:
        """Read every running trainer once; poke the resources whose status would change."""
        reporter = self.reporter
        for gone in set(self.tracks) - {uid_of(body) for body in reporter.finetunes.values()}:
            for memory in (self.tracks, self.last_patch, self.shown_pod):
                memory.pop(gone, None)
        reads = []
        for key, body in list(reporter.finetunes.items()):
            pod = trainer_pod(reporter.current_pods(key))
            if pod is not None:
                reads.append(self._read(key, uid_of(body), pod))
        for key in await asyncio.gather(*reads):
            if key is not None:
                reporter.poke(key)

    async def _read(self, key: Key, uid: str | None, pod: Mapping[str, Any]) -> Key | None:
        namespace, name = key
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        now = datetime.now(timezone.utc)
        try:
            sample = await self.reader.read(namespace, meta.get("name"), status.get("podIP"))
            error = None
        except MetricsUnreadable as err:
            sample, error = None, str(err)
            log.debug("metrics of %s/%s: %s", namespace, name, error)
        body = self.reporter.finetunes.get(key)
        if body is None or uid_of(body) != uid:
            return None  # deleted (or made again) while it was read
        before = self.tracks.get(uid) or MetricsTrack()
        track = self.tracks[uid] = observe(before, meta.get("name"), now, sample=sample, error=error)
        shown = metric_fields(self._previous(key))
        values = changed(shown, {**shown, **metrics_status(track, now, _checkpoint_base(self.reporter, key, body))})
        noted = (before.stale_since is None) != (track.stale_since is None) or \
            attempt_note(before) != attempt_note(track) or before.retry_pending != track.retry_pending or \
            running_reason(before.last_good) != running_reason(track.last_good)
        return key if values or noted else None

    def _previous(self, key: Key) -> Mapping[str, Any]:
        written = self.reporter.written.get(key)
        if written is not None:
            return written
        return (self.reporter.finetunes.get(key) or {}).get("status") or {}

    def enrich(self, body: Mapping[str, Any], desired: dict[str, Any], now: datetime) -> dict[str, Any]:
        """The reporter's hook: `desired` with the metrics merged in."""
        meta = body.get("metadata") or {}
        key, uid = (meta.get("namespace"), meta.get("name")), meta.get("uid")
        track = self.tracks.get(uid)
        out, moved = merge_metrics(
            desired, self._previous(key), track,
            ended_summary(self.reporter.current_pods(key), track.values_pod if track is not None else None),
            _checkpoint_base(self.reporter, key, body), now, self.last_patch.get(uid),
            self.settings.status_min_interval, shown_pod=self.shown_pod.get(uid))
        if moved:
            self.last_patch[uid] = now
            if track is not None and track.values_pod:
                self.shown_pod[uid] = track.values_pod
        return out
