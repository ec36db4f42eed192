"""The leader Lease: who may act, decided by `next_move`, and two operators contending over an API that checks
resourceVersions as the API server does (one writer wins each version)."""

from __future__ import annotations

import asyncio
import copy

import pytest

from qlora_operator import leader
from qlora_operator.kube import ApiError
from qlora_operator.leader import LeaderLease, Seen, next_move


def lease(holder, renew="2026-12-08T10:00:00Z", transitions=0, duration=15):
    return {"metadata": {"resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "renewTime": renew, "leaseTransitions": transitions,
                     "leaseDurationSeconds": duration}}


def test_next_move():
    assert next_move(None, "me", None, 0.0) == ("create", None)
    assert next_move(lease("me"), "me", None, 0.0)[0] == "renew"
    assert next_move(lease(None), "me", None, 0.0)[0] == "take"
    # Held by another: wait for as long as the Lease lasts from when this record was first seen, by our clock.
    move, seen = next_move(lease("other"), "me", None, 100.0)
    assert move == "wait" and seen.at == 100.0
    assert next_move(lease("other"), "me", seen, 114.9) == ("wait", seen)
    assert next_move(lease("other"), "me", seen, 115.0)[0] == "take"
    # A renewal is a new record: the wait starts again, whatever the holder's clock says.
    move, again = next_move(lease("other", renew="2026-12-08T09:00:00Z"), "me", seen, 114.9)
    assert move == "wait" and again == Seen(("other", "2026-12-08T09:00:00Z", 0), 114.9)


class FakeApi:
    """Leases in memory; a write over a stale resourceVersion is a 409, as on the API server."""

    def __init__(self):
        self.leases: dict[tuple[str, str], dict] = {}
        self.version = 0

    def _store(self, key, obj):
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.leases[key] = obj
        return copy.deepcopy(obj)

    async def get(self, kind, namespace, name):
        found = self.leases.get((namespace, name))
        return copy.deepcopy(found) if found else None

    async def create(self, obj):
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key in self.leases:
            raise ApiError(409, "AlreadyExists", "exists")
        return self._store(key, copy.deepcopy(obj))

    async def patch(self, kind, namespace, name, patch):
        current = self.leases[(namespace, name)]
        if patch["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        merged = copy.deepcopy(current)
        merged["spec"].update(patch["spec"])
        return self._store((namespace, name), merged)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(leader, "RETRY_SECONDS", 0.01)
    monkeypatch.setattr(leader, "RENEW_SECONDS", 0.05)
    monkeypatch.setattr(leader, "LEASE_SECONDS", 0.3)


def test_two_operators_one_acts_the_other_waits_then_takes_over_when_it_is_handed_back(fast):
    async def scenario():
        api = FakeApi()
        first, second = (LeaderLease(api, "ops", "qlora", who) for who in ("a", "b"))
        await first.acquire()
        lost = asyncio.Event()
        keeping = asyncio.create_task(first.keep(lost))
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(0.6)  # twice the Lease's duration: renewed all along, so never taken
        assert not waiting.done() and not lost.is_set()
        assert api.leases["ops", "qlora"]["spec"]["holderIdentity"] == "a"
        keeping.cancel()
        await first.release()
        await asyncio.wait_for(waiting, 5)
        spec = api.leases["ops", "qlora"]["spec"]
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1

    asyncio.run(scenario())


def test_a_holder_that_stops_renewing_is_taken_over_and_learns_it_lost(fast):
    async def scenario():
        api = FakeApi()
        first, second = (LeaderLease(api, "ops", "qlora", who) for who in ("a", "b"))
        await first.acquire()
        await asyncio.wait_for(second.acquire(), 5)  # a never renews: b takes the Lease once it ran out
        lost = asyncio.Event()
        await asyncio.wait_for(first.keep(lost), 5)  # a wakes up, sees b, and stops
        assert lost.is_set() and api.leases["ops", "qlora"]["spec"]["holderIdentity"] == "b"

    asyncio.run(scenario())


def test_a_holder_that_cannot_reach_the_api_server_stops_before_its_lease_runs_out(fast):
    async def scenario():
        api = FakeApi()
        first = LeaderLease(api, "ops", "qlora", "a")
        await first.acquire()

        async def unreachable(*args):
            raise ApiError(0, "ClientConnectorError", "connection refused")

        api.get = unreachable
        lost = asyncio.Event()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(first.keep(lost), 5)
        assert lost.is_set() and loop.time() - started < leader.LEASE_SECONDS

    asyncio.run(scenario())
