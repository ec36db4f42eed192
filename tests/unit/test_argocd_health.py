"""The Argo CD health check of docs/argocd-health.lua, run the way Argo CD runs it: Lua 5.1 (Argo CD's gopher-lua
speaks 5.1), the resource as the global `obj`, the script's top-level `return` as the answer.

The objects below are QLoRAFinetunes as the API server returns them (shared/API.md's status); the cluster test
tests/cluster/test_helm.py runs the same script on the objects of a real run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

try:
    from lupa import lua51
except ImportError:  # a test dependency (pyproject's dev extra); say so rather than skip
    lua51 = None

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docs" / "argocd-health.lua"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def argocd_health(obj: dict) -> dict:
    """Run the health script on `obj` like Argo CD does and return its {status, message}."""
    if lua51 is None:
        pytest.fail("lupa (Lua in Python) is missing: pip install lupa")
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    # Argo CD hands the script a Lua table made from the object's JSON.
    runtime.globals().obj = _to_lua(runtime, json.loads(json.dumps(obj)))
    result = runtime.execute(SCRIPT.read_text())
    assert result is not None, "the script must return a table"
    out = dict(result)
    assert out["status"] in ARGO_STATUSES
    return out


def _to_lua(runtime, value):
    if isinstance(value, dict):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def finetune(status: dict | None, generation: int = 1) -> dict:
    obj = {
        "apiVersion": "qlora.io/v1alpha1",
        "kind": "QLoRAFinetune",
        "metadata": {"name": "support-bot", "namespace": "ml", "generation": generation,
                     "uid": "6d1f3b8e-0d7c-4d0e-9d59-0b7a4d1b2f11"},
        "spec": {"dataset": {"configMap": {"name": "support-qa", "key": "data.jsonl"}},
                 "output": {"pvc": {"claimName": "adapters", "path": "support-bot"}}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def cond(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-27T22:00:00Z", "observedGeneration": 1}


PENDING = {
    "phase": "Pending", "observedGeneration": 1, "jobName": "support-bot", "attempts": 0,
    "message": "Waiting for the pod to be scheduled",
    "conditions": [cond("SpecValid", "True", "Valid"), cond("JobCreated", "True", "Created"),
                   cond("Running", "False", "Pending", "Waiting for the pod to be scheduled")],
}
RUNNING = {
    "phase": "Running", "observedGeneration": 1, "jobName": "support-bot", "attempts": 1,
    "startTime": "2026-11-27T22:00:05Z", "progress": "42%", "step": 84, "totalSteps": 200, "epoch": 1.26,
    "loss": 1.234, "learningRate": 4.1e-05, "tokensPerSecond": 5210.5, "eta": "3m12s",
    "estimatedCompletionTime": "2026-11-27T22:09:17Z", "lastCheckpoint": {"step": 80, "path": "/out/ckpt-80"},
    "conditions": [cond("SpecValid", "True", "Valid"), cond("JobCreated", "True", "Created"),
                   cond("Running", "True", "Training", "Training on 1 GPU")],
}
SUCCEEDED = {
    "phase": "Succeeded", "observedGeneration": 1, "jobName": "support-bot", "attempts": 1,
    "startTime": "2026-11-27T22:00:05Z", "completionTime": "2026-11-27T22:12:40Z", "progress": "100%",
    "step": 200, "totalSteps": 200, "loss": 0.812, "evalLoss": 0.9, "outputPath": "adapters:/support-bot",
    "message": "Fine-tune finished; the adapter is in adapters:/support-bot",
    "conditions": [cond("SpecValid", "True", "Valid"), cond("JobCreated", "True", "Created"),
                   cond("Running", "False", "Completed"), cond("Succeeded", "True", "Completed")],
}
FAILED = {
    "phase": "Failed", "observedGeneration": 1, "jobName": "support-bot", "attempts": 1,
    "message": "CUDA ran out of memory at step 12; lower training.batchSize or training.maxLength",
    "conditions": [cond("SpecValid", "True", "Valid"), cond("JobCreated", "True", "Created"),
                   cond("Succeeded", "False", "CUDAOutOfMemory",
                        "CUDA ran out of memory at step 12; lower training.batchSize or training.maxLength")],
}
INVALID = {
    "phase": "Failed", "observedGeneration": 1,
    "conditions": [cond("SpecValid", "False", "SecretNotFound", "Secret ml/hf-token not found"),
                   cond("Succeeded", "False", "SecretNotFound", "Secret ml/hf-token not found")],
}
SUSPENDED = {
    "phase": "Suspended", "observedGeneration": 1, "jobName": "support-bot", "step": 40, "totalSteps": 200,
    "progress": "20%", "message": "Suspended (spec.suspend is true); progress is kept",
    "conditions": [cond("Suspended", "True", "Suspended", "spec.suspend is true")],
}


def test_no_status_yet_is_progressing():
    health = argocd_health(finetune(None))
    assert health["status"] == "Progressing"
    assert "operator" in health["message"]


@pytest.mark.parametrize("status", [PENDING, RUNNING], ids=["pending", "running"])
def test_pending_and_running_are_progressing(status):
    assert argocd_health(finetune(status))["status"] == "Progressing"


def test_running_message_shows_progress_loss_and_eta():
    message = argocd_health(finetune(RUNNING))["message"]
    assert message.startswith("Running: 42% (step 84/200)")
    assert "loss 1.234" in message and "ETA 3m12s" in message


def test_pending_message_is_the_operators_message():
    assert argocd_health(finetune(PENDING))["message"] == "Waiting for the pod to be scheduled"


def test_succeeded_is_healthy_and_names_the_adapter():
    health = argocd_health(finetune(SUCCEEDED))
    assert health == {"status": "Healthy", "message": "Fine-tune succeeded; adapter at adapters:/support-bot"}


@pytest.mark.parametrize("status,reason", [(FAILED, "CUDAOutOfMemory"), (INVALID, "SecretNotFound")])
def test_failed_is_degraded_with_reason_and_message(status, reason):
    health = argocd_health(finetune(status))
    assert health["status"] == "Degraded"
    assert health["message"].startswith(reason + ": ")
    expected_message = status.get("message") or status["conditions"][-1]["message"]
    assert health["message"].endswith(expected_message)


def test_failed_without_condition_or_message_still_degraded():
    health = argocd_health(finetune({"phase": "Failed", "observedGeneration": 1}))
    assert health == {"status": "Degraded", "message": "Fine-tune failed"}


def test_suspended_is_suspended():
    health = argocd_health(finetune(SUSPENDED))
    assert health["status"] == "Suspended"
    assert "Suspended" in health["message"]


def test_status_older_than_the_spec_is_progressing_even_when_succeeded():
    # Only suspend/TTL/deadline may change after creation; until the operator observes such a change the
    # old verdict must not be reported as current.
    health = argocd_health(finetune(SUCCEEDED, generation=2))
    assert health["status"] == "Progressing"
    assert "generation 2" in health["message"]


def test_a_run_whose_outcome_is_unknown_is_unknown():
    status = {"phase": "Unknown", "observedGeneration": 1,
              "message": "the Job support-bot is gone; its outcome is unknown"}
    assert argocd_health(finetune(status)) == {"status": "Unknown", "message": status["message"]}


def test_unknown_phase_from_a_newer_operator_is_progressing():
    assert argocd_health(finetune({"phase": "Queued", "observedGeneration": 1}))["status"] == "Progressing"


def test_gitops_doc_carries_the_same_script():
    """docs/gitops.md shows the argocd-cm snippet; its Lua must be the script tested here, line for line."""
    doc = (REPO / "docs" / "gitops.md").read_text()
    block = re.search(r"resource\.customizations\.health\.qlora\.io_QLoRAFinetune: \|\n(.*?)```", doc, re.S)
    assert block, "docs/gitops.md must show the argocd-cm key with the script"
    shown = [line[4:] if line.startswith("    ") else line.strip() for line in block.group(1).rstrip().splitlines()]
    assert shown == SCRIPT.read_text().rstrip().splitlines()
