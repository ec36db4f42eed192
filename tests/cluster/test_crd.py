"""The generated CRD on a real API server: installed, examples accepted, defaults applied, descriptions
served, columns printed, invalid resources refused at apply time naming the field, spec immutable but for
the fields API.md names."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

import pytest
import yaml

from qlora_operator import api, crdgen

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

MINIMAL = {
    "apiVersion": api.API_VERSION,
    "kind": api.KIND,
    "metadata": {"name": "support-bot"},
    "spec": {
        "dataset": {"configMap": {"name": "support-qa", "key": "data.jsonl"}},
        "output": {"pvc": {"claimName": "adapters", "path": "support-bot"}},
    },
}


@pytest.fixture(scope="module")
def crd(cluster):
    """The CRD from crds/, applied (server-side, so other tests' copies of it merge) and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crdgen.CRD_PATH))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{api.CRD_NAME}", "--timeout=60s")
    return cluster.kubectl_json("get", "crd", api.CRD_NAME)


@pytest.fixture(scope="module")
def scratch(cluster, crd):
    """One namespace for the refusals: nothing is created there, so the table's rows cannot collide."""
    name = f"t-crd-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def resource(name: str | None = None, **spec_sections) -> dict:
    body = copy.deepcopy(MINIMAL)
    body["metadata"]["name"] = name or f"ft-{uuid.uuid4().hex[:8]}"
    body["spec"].update(spec_sections)
    return body


def apply(kubectl, body: dict, check: bool = True):
    return kubectl("apply", "--validate=strict", "-f", "-", input=yaml.safe_dump(body), check=check)


def test_crd_is_established_with_its_names(crd):
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert crd["status"]["acceptedNames"]["shortNames"] == ["qft", "qlora"]
    assert crd["status"]["acceptedNames"]["categories"] == ["all", "ml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_accepted_strictly(crd, kubectl, path):
    out = kubectl("apply", "--validate=strict", "-f", str(path)).stdout
    finetune = next(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d["kind"] == api.KIND)
    name = finetune["metadata"]["name"]
    assert f"qlorafinetune.qlora.io/{name}" in out
    stored = kubectl.json("get", "qft", name)
    # what the API server kept is what the models make of the example: nothing pruned, the same defaults
    assert stored["spec"] == api.QLoRAFinetuneSpec.model_validate(finetune["spec"]).to_wire()


def test_api_server_fills_in_the_defaults(crd, kubectl):
    apply(kubectl, resource("support-bot"))
    shown = kubectl("get", "qft", "support-bot", "-o", "yaml").stdout
    for line in ("r: 16", "useRslora: true", "learningRate: 5e-05", "optimizer: paged_adamw_8bit", "bits: 4"):
        assert line in shown
    spec = kubectl.json("get", "qft", "support-bot")["spec"]  # JSON: PyYAML reads 5e-05 as a string
    assert spec["lora"] == {
        "r": 16, "alpha": 32, "dropout": 0.1, "useRslora": True, "init": "gaussian", "bias": "none"
    }
    assert spec["quantization"] == {"bits": 4, "doubleQuant": True, "computeDtype": "bfloat16"}
    assert spec["training"]["epochs"] == 3 and spec["training"]["batchSize"] == 2
    assert spec["training"]["learningRate"] == 5e-5 and spec["training"]["optimizer"] == "paged_adamw_8bit"
    assert spec["resources"] == {"gpus": 1, "nodes": 1, "gpuResourceName": "nvidia.com/gpu"}
    assert spec["model"] == {"revision": "main", "trustRemoteCode": False}  # name: the operator's default
    assert spec["runtime"] == {"backoffLimit": 3, "rendezvousTimeoutSeconds": 600} and spec["suspend"] is False
    assert spec["dataset"]["evalFraction"] == 0.05 and spec["dataset"]["format"] == "auto"
    assert spec == api.QLoRAFinetuneSpec.model_validate(MINIMAL["spec"]).to_wire()


def test_explain_prints_the_description(crd, cluster):
    def explained():
        out = cluster.kubectl("explain", "qft.spec.lora.r", check=False).stdout
        return out if "LoRA rank" in out else None

    out = cluster.wait_until(explained, timeout=60, what="kubectl explain to serve the CRD's OpenAPI")
    assert "<integer>" in out and "1 to 1024" in out
    assert "Modules that get adapters" in cluster.kubectl("explain", "qft.spec.lora.targetModules").stdout


def test_get_prints_the_columns_of_api_md(crd, kubectl):
    apply(kubectl, resource("columns"))
    status = api.QLoRAFinetuneStatus.model_validate(
        {
            "phase": "Running",
            "progress": "42%",
            "step": 126,
            "totalSteps": 300,
            "epoch": 1.26,
            "loss": 1.2345,
            "eta": "3m12s",
            "model": {"name": "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", "revision": "main"},
            "conditions": [
                {"type": "Running", "status": "True", "reason": "TrainerRunning", "message": "step 126 of 300",
                 "lastTransitionTime": "2026-11-27T22:00:00Z", "observedGeneration": 1}
            ],
        }
    )
    kubectl("patch", "qft", "columns", "--subresource=status", "--type=merge", "-p",
            yaml.safe_dump({"status": status.to_wire()}))
    header, row = kubectl("get", "qft", "columns").stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "EPOCH", "ETA", "AGE"]
    assert row.split()[:6] == ["columns", "Running", "42%", "1.2345", "1.26", "3m12s"]
    wide_header, wide_row = kubectl("get", "qlora", "columns", "-o", "wide").stdout.splitlines()[:2]
    assert wide_header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "EPOCH", "ETA", "MODEL", "AGE"]
    assert "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct" in wide_row.split()
    assert kubectl.json("get", "qft", "columns")["status"] == status.to_wire()
    assert "columns" in kubectl("get", "ml").stdout  # the `ml` category


def with_spec(mutate) -> dict:
    body = resource()
    mutate(body["spec"])
    return body


def set_path(path: str, value):
    """A mutation that sets spec.<path> (dots between keys), making parents as needed."""

    def mutate(spec: dict) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def drop(key: str):
    return lambda spec: spec.pop(key)


INVALID = [
    # (id, mutation of a valid spec, text the refusal must contain: the field, and what is wrong)
    ("unknown-field", set_path("lora.rank", 8), 'unknown field "spec.lora.rank"'),
    ("no-dataset-source", lambda s: s.update(dataset={"format": "qa"}), "spec.dataset"),
    ("two-dataset-sources", set_path("dataset.hf", {"name": "org/data"}), "more than one dataset source"),
    ("no-dataset", drop("dataset"), "spec.dataset: Required value"),
    ("lora-r-zero", set_path("lora.r", 0), "spec.lora.r"),
    ("lora-r-too-big", set_path("lora.r", 2048), "spec.lora.r"),
    ("lora-alpha-zero", set_path("lora.alpha", 0), "spec.lora.alpha"),
    ("lora-dropout-one", set_path("lora.dropout", 1), "spec.lora.dropout"),
    ("lora-init-unknown", set_path("lora.init", "xavier"), "spec.lora.init"),
    ("negative-learning-rate", set_path("training.learningRate", -0.0001), "spec.training.learningRate"),
    ("learning-rate-above-one", set_path("training.learningRate", 2), "spec.training.learningRate"),
    ("bits-3", set_path("quantization.bits", 3), "spec.quantization.bits"),
    ("type-with-8-bits", set_path("quantization", {"bits": 8, "type": "nf4"}), "spec.quantization.type"),
    ("eval-fraction-0.9", set_path("dataset.evalFraction", 0.9), "spec.dataset.evalFraction"),
    ("inline-501-records", lambda s: s.update(dataset={"inline": [{"text": "x"}] * 501}), "spec.dataset.inline"),
    ("inline-empty", lambda s: s.update(dataset={"inline": []}), "spec.dataset.inline"),
    ("empty-output", set_path("output", {}), "spec.output.pvc: Required value"),
    ("no-output", drop("output"), "spec.output: Required value"),
    ("output-absolute-path", set_path("output.pvc.path", "/etc"), "spec.output.pvc.path"),
    ("output-path-escapes", set_path("output.pvc.path", "a/../../b"), "spec.output.pvc.path"),
    ("epochs-zero", set_path("training.epochs", 0), "spec.training.epochs"),
    ("max-steps-zero", set_path("training.maxSteps", 0), "spec.training.maxSteps"),
    ("batch-size-zero", set_path("training.batchSize", 0), "spec.training.batchSize"),
    ("batch-size-word", set_path("training.batchSize", "large"), "spec.training.batchSize"),
    ("max-length-8", set_path("training.maxLength", 8), "spec.training.maxLength"),
    ("scheduler-unknown", set_path("training.scheduler", "cyclic"), "spec.training.scheduler"),
    ("optimizer-unknown", set_path("training.optimizer", "adamw_magic"), "spec.training.optimizer"),
    ("report-to-unknown", set_path("training.reportTo", ["neptune"]), "spec.training.reportTo[0]"),
    ("warmup-ratio-2", set_path("training.warmupRatio", 2), "spec.training.warmupRatio"),
    ("gpus-negative", set_path("resources.gpus", -1), "spec.resources.gpus"),
    ("nodes-zero", set_path("resources.nodes", 0), "spec.resources.nodes"),
    ("memory-not-a-quantity", set_path("resources.memory", "lots"), "spec.resources.memory"),
    ("backoff-negative", set_path("runtime.backoffLimit", -1), "spec.runtime.backoffLimit"),
    ("hf-token-literal", set_path("runtime.env", [{"name": "HF_TOKEN", "value": "hf_x"}]),
     "spec.runtime.env[0].value"),
    ("operator-env-name", set_path("runtime.env", [{"name": "QLORA_CONFIG", "value": "{}"}]),
     "spec.runtime.env[0].name"),
    ("env-twice", set_path("runtime.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
     "spec.runtime.env[1]"),
    ("target-modules-word", set_path("lora.targetModules", "q_proj"), "spec.lora.targetModules"),
    ("target-modules-empty-name", set_path("lora.targetModules", [""]), "spec.lora.targetModules[0]"),
    ("config-map-bad-name", set_path("dataset.configMap.name", "Support_QA"), "spec.dataset.configMap.name"),
    ("token-secret-no-name", set_path("model.tokenSecretRef", {"key": "HF_TOKEN"}),
     "spec.model.tokenSecretRef.name: Required value"),
    ("queue-name-bad", set_path("runtime.queueName", "GPU Queue"), "spec.runtime.queueName"),
]


@pytest.mark.parametrize("mutate, expected", [row[1:] for row in INVALID], ids=[row[0] for row in INVALID])
def test_invalid_resources_are_refused_naming_the_field(cluster, scratch, mutate, expected):
    body = with_spec(mutate)
    proc = cluster.kubectl("apply", "--validate=strict", "-f", "-", input=yaml.safe_dump(body),
                           namespace=scratch, check=False)
    assert proc.returncode != 0, f"accepted: {body['spec']}"
    assert expected in proc.stderr, proc.stderr
    assert cluster.kubectl("get", "qft", body["metadata"]["name"], namespace=scratch, check=False).returncode != 0


def test_missing_spec_is_refused(cluster, scratch):
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "no-spec"}}
    proc = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(body), namespace=scratch, check=False)
    assert proc.returncode != 0 and "spec: Required value" in proc.stderr


CHANGES = [
    ("spec.lora", set_path("lora.r", 32)),
    ("spec.training", set_path("training.maxSteps", 10)),
    ("spec.dataset", set_path("dataset.configMap.key", "other.jsonl")),
    ("spec.output", set_path("output.mergeAdapter", True)),
    ("spec.runtime.image", set_path("runtime.image", "example/trainer:2")),
    ("spec.runtime.queueName", set_path("runtime.queueName", "later")),  # absent before: added is a change too
    ("spec.model", set_path("model.name", "org/other-model")),
]


@pytest.mark.parametrize("field, mutate", CHANGES, ids=[field for field, _ in CHANGES])
def test_spec_cannot_change_after_creation(crd, kubectl, field, mutate):
    body = resource("fixed")
    apply(kubectl, body)
    changed = copy.deepcopy(body)
    mutate(changed["spec"])
    proc = apply(kubectl, changed, check=False)
    assert proc.returncode != 0
    assert f"{field} cannot change after creation" in proc.stderr and "new metadata.name" in proc.stderr
    assert kubectl.json("get", "qft", "fixed")["metadata"]["generation"] == 1


def test_suspend_and_the_two_runtime_fields_may_change(crd, kubectl):
    body = resource("adjustable", runtime={"activeDeadlineSeconds": 3600})
    apply(kubectl, body)
    kubectl("patch", "qft", "adjustable", "--type=merge", "-p", '{"spec": {"suspend": true}}')
    changed = copy.deepcopy(body)
    changed["spec"]["suspend"] = True
    changed["spec"]["runtime"] = {"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 600}
    apply(kubectl, changed)
    stored = kubectl.json("get", "qft", "adjustable")
    assert stored["spec"]["suspend"] is True
    assert stored["spec"]["runtime"] == {"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 600,
                                         "backoffLimit": 3, "rendezvousTimeoutSeconds": 600}
    kubectl("patch", "qft", "adjustable", "--type=merge", "-p", '{"spec": {"suspend": false}}')
    assert kubectl.json("get", "qft", "adjustable")["spec"]["suspend"] is False
