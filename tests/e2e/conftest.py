"""End-to-end fixtures: the demo's inputs (tiny model, bilingual QA set) in a test namespace, the demo's
`QLoRAFinetune` applied with kubectl, and a recorder of the resource's status as the API server serves it.

- `tiny_model` (session): the tiny random-weight model folder (hack/demo/inputs.py), made once.
- `trainer_image` (session): the trainer image (Dockerfile.trainer, the operator's default) on the node.
- `demo_inputs` (function): the trainer image on the node and, in the test's namespace, the `models` and `adapters` volumes with the model copied
  in, and the `demo-qa` (good) and `demo-qa-bad` (line 3 without an answer) ConfigMaps.
- `finetune(name, **training)`: the demo resource (hack/demo/finetune.yaml) under another name, training
  overrides merged in; `apply(resource)` applies it with `kubectl apply -f -`.
- `operator_process(cluster, namespace, **settings)`: an operator reading metrics every second.
- `StatusRecorder`: watches one resource and keeps every status the API server showed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from hack.demo.inputs import bad_records, jsonl, make_model, qa_records
from tests.cluster.operator_fixture import OperatorProcess, crd  # noqa: F401 (crd is a fixture)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "hack" / "demo"
GROUP, VERSION, PLURAL = "qlora.io", "v1alpha1", "qlorafinetunes"
# A CPU run of the tiny model: loading takes seconds, a step from 0.05 s (idle) to 1 s (a busy 2-core machine).
RUN_TIMEOUT = 600
# Metrics read five times a second: an idle machine runs a step of the tiny model in well under a tenth of a
# second, and the tests must see the steps of a run go by.
FAST_METRICS = {"scrape_interval": 0.2, "status_min_interval": 0.1}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("inputs") / "tiny-llama")


def volume_folder(cluster, namespace: str, claim: str) -> Path:
    """The host folder of a bound PVC of the local cluster (its PV is a hostPath)."""
    def bound():
        pvc = cluster.kubectl_json("get", "pvc", claim, namespace=namespace)
        return pvc["spec"].get("volumeName") if pvc.get("status", {}).get("phase") == "Bound" else None

    pv = cluster.wait_until(bound, timeout=60, what=f"PVC {claim} to be bound")
    return Path(cluster.kubectl_json("get", "pv", pv)["spec"]["hostPath"]["path"])


class DemoInputs:
    def __init__(self, cluster, namespace: str, model: Path):
        self.cluster, self.namespace = cluster, namespace
        cluster.kubectl("apply", "-f", str(DEMO / "volumes.yaml"), namespace=namespace)
        shutil.copytree(model, volume_folder(cluster, namespace, "models") / "tiny-llama")
        self.output_root = volume_folder(cluster, namespace, "adapters")
        for name, records in (("demo-qa", qa_records()), ("demo-qa-bad", bad_records())):
            config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                          "data": {"data.jsonl": jsonl(records)}}
            cluster.kubectl("apply", "-f", "-", input=json.dumps(config_map), namespace=namespace)

    def output(self, resource: dict) -> Path:
        """The host folder of a resource's output (`spec.output.pvc.path` in the `adapters` volume)."""
        return self.output_root / resource["spec"]["output"]["pvc"]["path"]


@pytest.fixture(scope="session")
def trainer_image(cluster) -> None:
    cluster.load("trainer")  # built from Dockerfile.trainer when its cached archive is missing


@pytest.fixture
def demo_inputs(cluster, namespace, tiny_model, trainer_image) -> DemoInputs:
    return DemoInputs(cluster, namespace, tiny_model)


def finetune(name: str, dataset: str = "demo-qa", **training) -> dict:
    resource = yaml.safe_load((DEMO / "finetune.yaml").read_text())
    resource = copy.deepcopy(resource)
    resource["metadata"]["name"] = name
    resource["spec"]["dataset"]["configMap"]["name"] = dataset
    resource["spec"]["output"]["pvc"]["path"] = name
    resource["spec"]["training"].update(training)
    return resource


def operator_process(cluster, namespace: str, **settings) -> OperatorProcess:
    """An operator for the test's namespace with fast metrics (a context manager starts and stops it)."""
    return OperatorProcess(cluster, [namespace], **{**FAST_METRICS, **settings})


def apply(cluster, namespace: str, resource: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(resource), namespace=namespace)


class StatusRecorder:
    """Every status of one QLoRAFinetune the API server showed, from a watch (restarted when it ends)."""

    def __init__(self, cluster, namespace: str, name: str):
        from kubernetes import client, config

        self.api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
        self.namespace, self.name = namespace, name
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StatusRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                stream = watch.Watch().stream(
                    self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                    field_selector=f"metadata.name={self.name}", timeout_seconds=5)
                for event in stream:
                    status = (event.get("object") or {}).get("status")
                    if status:
                        with self._lock:
                            if not self.samples or self.samples[-1] != status:
                                self.samples.append(copy.deepcopy(status))
                    if self._stop.is_set():
                        break
            except Exception as err:  # noqa: BLE001 -- a watch ends or fails now and then; watch again
                self.errors.append(str(err))
                time.sleep(0.5)

    def all(self) -> list[dict]:
        with self._lock:
            return list(self.samples)

    def last(self) -> dict:
        samples = self.all()
        return samples[-1] if samples else {}

    def wait_for(self, predicate, timeout: float, what: str, after: dict | None = None) -> dict:
        """The first status for which `predicate` holds: of all seen so far, or of those after `after`."""
        deadline = time.monotonic() + timeout
        seen = self.all().index(after) + 1 if after is not None else 0
        while time.monotonic() < deadline:
            samples = self.all()
            for status in samples[seen:]:
                if predicate(status):
                    return status
            seen = len(samples)
            last = samples[-1] if samples else {}
            if last.get("phase") in ("Succeeded", "Failed") and not predicate(last):
                pytest.fail(f"{what}: the run ended first: {json.dumps(last, indent=1)}")
            time.sleep(0.05)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last status: "
                    f"{json.dumps(self.last(), indent=1)}")


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or () if c.get("type") == type_), {})


def trainer_pid(pod_ip: str) -> int | None:
    """The pid, on this machine, of the trainer process of the pod with this IP (the container's processes are
    the host's too, in namespaces of their own; its environment holds the POD_IP the Job sets)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"POD_IP={pod_ip}".encode() in environ and b"qlora_trainer" in cmdline:
            return int(entry.name)
    return None


def signal_trainer(pod_ip: str, signum: int) -> int:
    """Send a signal to the trainer of one pod (SIGKILL: a crash or the OOM killer; SIGSTOP: a hang);
    returns its pid."""
    pid = trainer_pid(pod_ip)
    assert pid is not None, f"no trainer process with POD_IP={pod_ip}"
    os.kill(pid, signum)
    return pid
