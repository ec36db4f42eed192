"""One operator at a time: a `coordination.k8s.io/v1` Lease that the acting operator holds and renews.

Two operators on the same runs (a second replica by mistake, a second install, an upgrade that overlaps) would
both create Jobs, restart ranks and write status from views a moment apart. With `QLORA_LEADER_LEASE` set (the
chart sets it), an operator first takes the Lease, and waits while another holds it. It renews the Lease every
few seconds. If it cannot renew before the Lease runs out, it stops handling runs and exits, so that at no
moment do two operators act. A clean stop hands the Lease back, so the next operator starts at once.

Whether a holder is gone is judged as client-go judges it: by this process's own clock, from when it first saw
the Lease's current record. The holder's timestamps are not compared with local time, so clock skew between
machines does not matter.

`next_move` is pure; `LeaderLease` does the calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from qlora_operator.kube import ApiError, Kube

log = logging.getLogger(__name__)

LEASE_SECONDS = 15  # a holder that has not renewed for this long is gone
RENEW_SECONDS = 5
RETRY_SECONDS = 2


@dataclass(frozen=True)
class Seen:
    """A Lease record (holder, renew time, transitions) as first seen, at this process's monotonic time."""

    record: tuple[Any, ...]
    at: float


def next_move(lease: dict[str, Any] | None, me: str, seen: Seen | None, now: float) -> tuple[str, Seen | None]:
    """What to do about the Lease: `create` it (there is none), `renew` it (ours), `take` it (nobody holds it,
    or its holder did not renew it for its duration, by our clock since we first saw that record), or `wait`."""
    if lease is None:
        return "create", None
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    if holder == me:
        return "renew", None
    if not holder:
        return "take", None
    record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
    if seen is None or seen.record != record:
        seen = Seen(record, now)
    duration = spec.get("leaseDurationSeconds") or LEASE_SECONDS
    return ("take" if now - seen.at >= duration else "wait"), seen


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderLease:
    """The Lease NAMESPACE/NAME, taken by `acquire`, kept by `keep`, given back by `release`."""

    def __init__(self, kube: Kube, namespace: str, name: str, identity: str):
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self._version: str | None = None  # resourceVersion of our last write

    def _spec(self, lease: dict[str, Any] | None, *, taking: bool) -> dict[str, Any]:
        spec = dict((lease or {}).get("spec") or {})
        now = _now()
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=LEASE_SECONDS, renewTime=now)
        if taking:
            spec.update(acquireTime=now, leaseTransitions=int(spec.get("leaseTransitions") or 0) + (1 if lease else 0))
        return spec

    async def _write(self, lease: dict[str, Any] | None, *, taking: bool) -> bool:
        """Create or update the Lease as ours, only over the version read (409: someone else wrote first)."""
        try:
            if lease is None:
                written = await self.kube.create({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(None, taking=True)})
            else:
                written = await self.kube.patch("Lease", self.namespace, self.name, {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": self._spec(lease, taking=taking)})
        except ApiError as err:
            if err.conflict:
                return False
            raise
        self._version = written["metadata"]["resourceVersion"]
        return True

    async def acquire(self) -> None:
        """Return once the Lease is ours; wait while another operator holds it."""
        seen: Seen | None = None
        waiting_for = None
        while True:
            try:
                lease = await self.kube.get("Lease", self.namespace, self.name)
                move, seen = next_move(lease, self.identity, seen, time.monotonic())
                if move != "wait" and await self._write(lease, taking=move != "renew"):
                    log.info("leader: holding Lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return
                holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
                if move == "wait" and holder != waiting_for:
                    waiting_for = holder
                    log.info("leader: Lease %s/%s is held by %s; waiting (another operator is acting)",
                             self.namespace, self.name, holder)
            except ApiError as err:
                if not err.transient:
                    raise
                log.warning("leader: cannot read Lease %s/%s yet: %s", self.namespace, self.name, err)
            await asyncio.sleep(RETRY_SECONDS)

    async def keep(self, lost: asyncio.Event) -> None:
        """Renew the Lease until cancelled; set `lost` when another took it or it ran out unrenewed."""
        deadline = time.monotonic() + LEASE_SECONDS
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                lease = await self.kube.get("Lease", self.namespace, self.name)
                holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
                if holder != self.identity:
                    log.error("leader: Lease %s/%s is now held by %s: stopping", self.namespace, self.name, holder)
                    lost.set()
                    return
                if await self._write(lease, taking=False):
                    deadline = time.monotonic() + LEASE_SECONDS
            except ApiError as err:
                log.warning("leader: cannot renew Lease %s/%s: %s", self.namespace, self.name, err)
            # Stop a little before the Lease runs out: a waiting operator may take it from then on.
            if time.monotonic() > deadline - RENEW_SECONDS:
                log.error("leader: Lease %s/%s not renewed for %ds: stopping", self.namespace, self.name,
                          LEASE_SECONDS - RENEW_SECONDS)
                lost.set()
                return

    async def release(self) -> None:
        """Hand the Lease back (a clean stop), so that a waiting operator takes it at once."""
        try:
            lease = await self.kube.get("Lease", self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                await self.kube.patch("Lease", self.namespace, self.name, {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": {"holderIdentity": None, "renewTime": None}})
                log.info("leader: Lease %s/%s given back", self.namespace, self.name)
        except ApiError as err:
            log.warning("leader: cannot give Lease %s/%s back: %s", self.namespace, self.name, err)
