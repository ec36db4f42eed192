"""The reporter's view of the cluster and its status writes, against a fake API server that keeps objects,
resourceVersions and the calls made: finished Jobs deleted in one event, names reused, lost watches, and the
calls a finished run does not cost."""

from __future__ import annotations

import asyncio
import copy

import pytest

from qlora_operator import reporter as reporter_module
from qlora_operator.kube import ApiError
from qlora_operator.reporter import Reporter
from qlora_operator.settings import Settings
from qlora_operator.status import Check

NS = "ml"
SPEC = {"dataset": {"configMap": {"name": "qa", "key": "data.jsonl"}},
        "output": {"pvc": {"claimName": "adapters", "path": "bot"}}}
LABELS = {"qlora.io/finetune": "bot"}


class FakeKube:
    """The calls the reporter makes, answered as the API server would, from `objects` (by kind and name)."""

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.lists: dict[str, list[dict]] = {"Job": [], "Pod": []}
        self.events: list[dict] = []
        self.calls: list[tuple] = []
        self.version = 100

    def put(self, kind, obj):
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[(kind, obj["metadata"]["name"])] = obj
        return obj

    async def get(self, kind, namespace, name):
        self.calls.append(("get", kind, name))
        return copy.deepcopy(self.objects.get((kind, name)))

    async def list(self, kind, namespace, label_selector=None, field_selector=None):
        self.calls.append(("list", kind))
        return copy.deepcopy(self.lists[kind])

    async def job_events(self, namespace, name, uid, reason):
        self.calls.append(("events", name, reason))
        return [e for e in self.events if e["reason"] == reason and e["involvedObject"]["uid"] == uid]

    async def patch_status(self, namespace, name, patch, resource_version=None):
        self.calls.append(("patch_status", name, resource_version))
        current = self.objects.get(("QLoRAFinetune", name))
        if current is None:
            raise ApiError(404, "NotFound", f"{name} not found")
        if resource_version and resource_version != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        status = {**current.get("status", {}), **patch}
        current["status"] = {k: v for k, v in status.items() if v is not None}
        return copy.deepcopy(self.put("QLoRAFinetune", current))

    async def post_event(self, involved, type_, reason, message):
        self.calls.append(("event", reason))

    def patches(self):
        return [c for c in self.calls if c[0] == "patch_status"]


def finetune(uid="uid-1", status=None):
    return {"apiVersion": "qlora.io/v1alpha1", "kind": "QLoRAFinetune",
            "metadata": {"namespace": NS, "name": "bot", "uid": uid, "generation": 1,
                         "creationTimestamp": "2026-11-27T11:00:00Z"},
            "spec": copy.deepcopy(SPEC), "status": copy.deepcopy(status or {})}


def job(owner="uid-1", uid="job-1", *conditions, active=0):
    return {"metadata": {"namespace": NS, "name": "bot", "uid": uid, "labels": dict(LABELS),
                         "ownerReferences": [{"controller": True, "uid": owner}]},
            "spec": {"template": {"spec": {"containers": [{"image": "trainer:1"}]}}},
            "status": {"active": active, "conditions": [{"type": t, "status": "True"} for t in conditions]}}


def pod(name="bot-abc", job_uid="job-1", phase="Running"):
    return {"metadata": {"namespace": NS, "name": name, "uid": f"pod-{name}", "labels": dict(LABELS),
                         "creationTimestamp": "2026-11-27T11:01:00Z",
                         "ownerReferences": [{"controller": True, "uid": job_uid}]},
            "status": {"phase": phase, "containerStatuses": [
                {"name": "trainer", "state": {"running": {"startedAt": "2026-11-27T11:01:05Z"}}}]}}


def reporter_with(kube, body):
    """A reporter that has seen `body` (stored by the fake API server, resourceVersion and all)."""
    reporter = Reporter(kube, Settings())
    reporter.saw_finetune(kube.put("QLoRAFinetune", body))
    return reporter


def run(coro):
    return asyncio.run(coro)


def succeeded(status):
    return next(c for c in status["conditions"] if c["type"] == "Succeeded")


# ----------------------------------------------------------------------- item 1: succeeded, then deleted

def test_a_job_deleted_with_its_completion_in_one_event_succeeds():
    kube = FakeKube()

    async def scenario():
        reporter = reporter_with(kube, finetune())
        reporter.saw_job(job())
        reporter.saw_pod(pod())
        running = await reporter.refresh(("ml", "bot"))
        assert running["phase"] == "Running"
        # Complete=True and the TTL's deletion, coalesced by the watch into one DELETED event.
        reporter.saw_job(job("uid-1", "job-1", "Complete"), deleted=True)
        reporter.saw_pod(pod(phase="Succeeded"), deleted=True)
        return await reporter.refresh(("ml", "bot"))

    status = run(scenario())
    assert status["phase"] == "Succeeded" and succeeded(status)["status"] == "True"
    assert ("event", "JobGone") not in kube.calls


def test_a_job_gone_while_the_operator_was_away_is_unknown_and_then_costs_no_call():
    kube = FakeKube()
    running = {"phase": "Running", "jobName": "bot", "conditions": []}

    async def scenario():
        reporter = reporter_with(kube, finetune(status=running))  # restarted: the Job is gone (404)
        first = await reporter.refresh(("ml", "bot"))
        kube.calls.clear()
        for _ in range(3):  # the resync, minute after minute
            await reporter.refresh(("ml", "bot"))
        return first

    status = run(scenario())
    assert status["phase"] == "Unknown" and succeeded(status)["status"] == "Unknown"
    assert succeeded(status)["reason"] == "JobGone" and "outcome is unknown" in status["message"]
    assert kube.calls == []


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_run_whose_job_is_gone_costs_no_get(phase):
    kube = FakeKube()
    done = {"phase": phase, "jobName": "bot", "observedGeneration": 1, "conditions": []}

    async def scenario():
        reporter = reporter_with(kube, finetune(status=done))
        await reporter.refresh(("ml", "bot"))

    run(scenario())
    assert [c for c in kube.calls if c[0] == "get"] == []


def test_a_relist_drops_what_a_lost_watch_never_said_was_deleted():
    kube = FakeKube()

    async def scenario():
        reporter = reporter_with(kube, finetune())
        reporter.saw_job(job(active=1))
        reporter.saw_pod(pod())
        poked = []
        reporter.poke = poked.append
        # The watch lost its place (410) while Job and pod were deleted; the lists show neither.
        await reporter.relist([NS])
        assert reporter.jobs == {} and reporter.pods == {} and poked == [("ml", "bot")]
        # And a list brings in what the view lacks.
        kube.lists["Job"] = [job("uid-1", "job-2")]
        await reporter.relist([NS])
        return reporter

    reporter = run(scenario())
    assert reporter.jobs[("ml", "bot")]["metadata"]["uid"] == "job-2"


def test_what_the_watch_shows_during_a_relist_wins_over_the_list():
    kube = FakeKube()

    async def scenario():
        reporter = reporter_with(kube, finetune())
        listing = kube.list

        async def slow_list(kind, namespace, label_selector=None, field_selector=None):
            answer = await listing(kind, namespace, label_selector, field_selector)
            if kind == "Pod":  # the Job is created while the lists are read
                reporter.saw_job(job())
            return answer

        kube.list = slow_list
        reporter.poke = lambda key: None
        await reporter.relist([NS])
        return reporter

    assert run(scenario()).jobs[("ml", "bot")]["metadata"]["uid"] == "job-1"


# ---------------------------------------------------------------------- items 2 and 3: a name reused

def test_the_old_objects_late_deleted_event_leaves_the_new_one_alone():
    reporter = Reporter(FakeKube(), Settings())
    reporter.saw_finetune(finetune("uid-1"))
    reporter.saw_finetune(finetune("uid-2"))
    reporter.saw_finetune(finetune("uid-1"), deleted=True)
    assert reporter.finetunes[("ml", "bot")]["metadata"]["uid"] == "uid-2"
    reporter.saw_finetune(finetune("uid-2"), deleted=True)
    assert ("ml", "bot") not in reporter.finetunes


def test_nothing_of_the_previous_run_carries_over_to_a_new_one_of_the_same_name():
    kube = FakeKube()

    async def scenario():
        reporter = reporter_with(kube, finetune("uid-1"))
        reporter.saw_job(job())
        reporter.saw_pod(pod())
        await reporter.refresh(("ml", "bot"))
        assert reporter.written[("ml", "bot")]["attempts"] == 1
        # Deleted and created again; the old pod is still terminating and sends events.
        reporter.saw_finetune(kube.put("QLoRAFinetune", finetune("uid-2")))
        reporter.saw_pod(pod())
        return await reporter.refresh(("ml", "bot"))

    status = run(scenario())
    assert status["phase"] == "Pending" and "jobName" not in status and "attempts" not in status


def test_a_refresh_in_flight_during_delete_and_create_does_not_write_onto_the_new_object():
    kube = FakeKube()
    running = {"phase": "Running", "jobName": "bot", "conditions": []}

    async def scenario():
        reporter = reporter_with(kube, finetune("uid-1", status=running))
        get = kube.get

        async def slow_get(kind, namespace, name):
            answer = await get(kind, namespace, name)
            # Meanwhile the resource is deleted and made again under its name.
            kube.objects.pop(("QLoRAFinetune", "bot"))
            reporter.saw_finetune(kube.put("QLoRAFinetune", finetune("uid-2")))
            kube.get = get
            return answer

        kube.get = slow_get
        reporter.poke = lambda key: None
        return await reporter.refresh(("ml", "bot"))

    assert run(scenario()) is None
    assert kube.objects[("QLoRAFinetune", "bot")]["status"] == {}  # the old run's verdict did not land
    assert kube.patches()[0][2] is not None  # it was written for one version only


def test_a_write_carries_the_resource_version_and_follows_its_own():
    kube = FakeKube()

    async def scenario():
        reporter = reporter_with(kube, finetune())
        reporter.saw_job(job())
        await reporter.refresh(("ml", "bot"))
        reporter.saw_pod(pod())
        await reporter.refresh(("ml", "bot"))

    run(scenario())
    first, second = kube.patches()
    assert first[2] == "101" and second[2] == "102"  # the version its own first write made


# ------------------------------------------------------------------- item 10: pods that cannot be made

def test_a_job_without_pods_says_why_the_job_controller_cannot_create_them():
    kube = FakeKube()
    kube.events.append({"reason": "FailedCreate", "involvedObject": {"uid": "job-1"},
                        "lastTimestamp": "2026-11-27T11:02:00Z",
                        "message": 'Error creating: pods "bot-x" is forbidden: exceeded quota: gpus, requested: '
                                   'requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=8, limited: '
                                   'requests.nvidia.com/gpu=8'})

    async def scenario():
        reporter = reporter_with(kube, finetune())
        reporter.saw_job(job())
        waiting = await reporter.refresh(("ml", "bot"))
        reporter.saw_pod(pod())
        kube.calls.clear()
        running = await reporter.refresh(("ml", "bot"))
        return waiting, running

    waiting, running = run(scenario())
    assert waiting["phase"] == "Pending" and succeeded(waiting)["reason"] == "QuotaExceeded"
    assert "exceeded quota: gpus" in waiting["message"]
    assert running["phase"] == "Running" and not [c for c in kube.calls if c[0] == "events"]


def test_a_retry_the_quota_refuses_says_so_and_an_older_refusal_is_forgotten():
    kube = FakeKube()
    refusal = {"reason": "FailedCreate", "involvedObject": {"uid": "job-1"}, "lastTimestamp": "2026-11-27T11:00:30Z",
               "message": 'Error creating: pods "bot-y" is forbidden: exceeded quota: gpus'}
    kube.events.append(refusal)
    failed = pod(phase="Failed")
    failed["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 1, "startedAt": "2026-11-27T11:01:05Z", "finishedAt": "2026-11-27T11:05:00Z"}}

    async def scenario():
        reporter = reporter_with(kube, finetune())
        reporter.saw_job(job())
        reporter.saw_pod(failed)  # created 11:01:00, after the refusal: that one was about an earlier pod
        before = await reporter.refresh(("ml", "bot"))
        kube.events.append(refusal | {"lastTimestamp": "2026-11-27T11:05:01Z"})  # its retry is refused
        return before, await reporter.refresh(("ml", "bot"))

    before, after = run(scenario())
    assert succeeded(before)["reason"] == "Retrying"
    assert succeeded(after)["reason"] == "QuotaExceeded" and after["phase"] == "Pending"


# --------------------------------------------------------------- finished Jobs of runs no longer known

def test_a_finished_job_deleted_after_its_run_is_not_kept():
    reporter = Reporter(FakeKube(), Settings())
    # The run's DELETED came first (forget ran); its Job's, finished, comes after.
    reporter.saw_job(job("uid-1", "job-1", "Complete"), deleted=True)
    assert reporter.ended_jobs == {}
    # Known under the name now: another run, whose Job this is not.
    reporter.saw_finetune(finetune("uid-2"))
    reporter.saw_job(job("uid-1", "job-1", "Complete"), deleted=True)
    assert reporter.ended_jobs == {}
    reporter.saw_job(job("uid-2", "job-2", "Complete"), deleted=True)
    assert list(reporter.ended_jobs) == [("ml", "bot")]


# ------------------------------------------------------------ a spec check whose one write met a conflict

def test_a_check_whose_write_meets_a_conflict_is_written_by_the_retry(monkeypatch):
    monkeypatch.setattr(reporter_module, "CONFLICT_RETRY_SECONDS", 0.0)
    kube = FakeKube()
    invalid = Check(False, "InvalidSpec", "the API server refused the Job: bad affinity", terminal=True)

    async def scenario():
        reporter = reporter_with(kube, finetune())
        newer = kube.put("QLoRAFinetune", copy.deepcopy(kube.objects[("QLoRAFinetune", "bot")]))
        assert await reporter.refresh(("ml", "bot"), check=invalid) is None  # 409: the watch has not shown it
        reporter.saw_finetune(copy.deepcopy(newer))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not reporter._tasks and kube.objects[("QLoRAFinetune", "bot")]["status"]:
                break
        await reporter.close()

    run(scenario())
    status = kube.objects[("QLoRAFinetune", "bot")]["status"]
    assert status["phase"] == "Failed"
    assert [c["reason"] for c in status["conditions"] if c["type"] == "SpecValid"] == ["InvalidSpec"]


def test_a_trimmed_pod_keeps_what_its_status_reads_and_not_the_rest():
    pod = {"metadata": {"name": "p", "namespace": "ns", "managedFields": [{"big": "x" * 1000}]},
           "spec": {"containers": [{"name": "trainer", "image": "t:1", "env": [{"name": "A", "value": "b"}],
                                    "resources": {"limits": {"memory": "2Gi"}}}], "volumes": [{"name": "v"}]},
           "status": {"phase": "Running"}}
    trimmed = reporter_module.trim_pod(pod)
    assert trimmed == {"metadata": {"name": "p", "namespace": "ns"},
                       "spec": {"containers": [{"name": "trainer", "resources": {"limits": {"memory": "2Gi"}}}]},
                       "status": {"phase": "Running"}}
