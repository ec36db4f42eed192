"""kopf's settings as `handlers.configure` makes them: what the watches ask the API server for."""

import asyncio
from types import SimpleNamespace

import aiohttp
import kopf
import pytest
from kopf._cogs.structs.references import Resource

from qlora_operator import handlers, regroup
from qlora_operator.api import GROUP, PLURAL, VERSION
from qlora_operator.reporter import Reporter
from qlora_operator.settings import Settings


def selector(settings: kopf.OperatorSettings, resource: Resource) -> str:
    # What kopf puts in a watch request's labelSelector (kopf._cogs.clients.watching).
    return ",".join(sorted(set(settings.watching.label_selectors.collect(resource))))


def test_the_watches_of_jobs_and_pods_ask_the_api_server_for_ours_only():
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    jobs = Resource("batch", "v1", "jobs", kind="Job", namespaced=True)
    pods = Resource("", "v1", "pods", kind="Pod", namespaced=True)
    finetunes = Resource(GROUP, VERSION, PLURAL, kind="QLoRAFinetune", namespaced=True)
    assert selector(settings, jobs) == selector(settings, pods) == "qlora.io/finetune"
    assert selector(settings, finetunes) == ""  # every QLoRAFinetune is ours


def test_a_resync_pass_that_raises_a_non_api_error_goes_on_to_the_next(monkeypatch):
    # aiohttp's ServerDisconnectedError is no OSError: the API server restarting during a relist raises it.
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 0.0)
    monkeypatch.setattr(handlers, "RELIST_EVERY", 1)

    class FakeReporter:
        finetunes: dict = {}

        def __init__(self):
            self.relists = 0

        async def relist(self, namespaces):
            self.relists += 1
            if self.relists == 1:
                raise aiohttp.ServerDisconnectedError()

    reporter = FakeReporter()
    op = SimpleNamespace(reporter=reporter, settings=SimpleNamespace(watch_namespaces=()))

    async def scenario():
        task = asyncio.get_running_loop().create_task(handlers._resync(op))
        for _ in range(100):
            await asyncio.sleep(0)
            if reporter.relists >= 2 or task.done():
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert reporter.relists >= 2


def _regrouping_job():
    return {"metadata": {"namespace": "ml", "name": "bot", "uid": "job-1", "labels": {"qlora.io/finetune": "bot"},
                         "annotations": {regroup.ANNOTATION: "rank 1 stopped"},
                         "ownerReferences": [{"controller": True, "uid": "uid-1"}]},
            "spec": {"completionMode": "Indexed", "completions": 2, "suspend": True},
            "status": {"active": 0}}


@pytest.mark.parametrize("meanwhile", ["nothing", "deleted", "changed"])
def test_a_patch_answer_does_not_undo_what_the_watch_showed_meanwhile(meanwhile):
    reporter = Reporter(None, Settings())
    reporter.saw_finetune({"metadata": {"namespace": "ml", "name": "bot", "uid": "uid-1"}, "spec": {}})
    newer = _regrouping_job() | {"status": {"active": 0, "succeeded": 1}}

    class FakeKube:
        async def patch(self, kind, namespace, name, patch):
            answer = _regrouping_job()
            answer["metadata"]["annotations"] = {}
            answer["spec"]["suspend"] = False
            if meanwhile == "deleted":
                reporter.saw_job(_regrouping_job(), deleted=True)
            elif meanwhile == "changed":
                reporter.saw_job(newer)
            return answer

    op = SimpleNamespace(reporter=reporter, kube=FakeKube())
    reporter.jobs[("ml", "bot")] = _regrouping_job()  # as the answer to the create, never shown by the watch
    reporter.poke = lambda key: None
    asyncio.run(handlers._regroup(op, ("ml", "bot")))
    view = reporter.jobs.get(("ml", "bot"))
    if meanwhile == "deleted":
        assert view is None
    elif meanwhile == "changed":
        assert view["status"] == newer["status"]
    else:
        assert view["spec"]["suspend"] is False  # the answer is all there is to know of it
