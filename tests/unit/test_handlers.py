"""kopf's settings as `handlers.configure` makes them: what the watches ask the API server for."""

import kopf
from kopf._cogs.structs.references import Resource

from qlora_operator import handlers
from qlora_operator.api import GROUP, PLURAL, VERSION


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
