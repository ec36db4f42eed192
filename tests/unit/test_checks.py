"""Checks the schema cannot make: the spec parses, and the objects it names exist (with a fake API)."""

import asyncio
import copy

import pytest

from qlora_operator.api import QLoRAFinetuneSpec
from qlora_operator.checks import check_references, parse_spec

SPEC = {
    "model": {"tokenSecretRef": {"name": "hf"}, "pvc": {"claimName": "models"}},
    "dataset": {"configMap": {"name": "qa", "key": "data.jsonl"}},
    "output": {"pvc": {"claimName": "adapters"}},
}
OBJECTS = {
    ("Secret", "hf"): {"data": {"HF_TOKEN": "aGZfeA=="}},
    ("ConfigMap", "qa"): {"data": {"data.jsonl": "{}"}},
    ("PersistentVolumeClaim", "adapters"): {},
    ("PersistentVolumeClaim", "models"): {},
}


def check(objects, spec=SPEC):
    asked = []

    async def get(kind, namespace, name):
        asked.append((kind, namespace, name))
        return copy.deepcopy(objects.get((kind, name)))

    result = asyncio.run(check_references(QLoRAFinetuneSpec.model_validate(spec), "ml", get))
    return result, asked


def without(key):
    return {k: v for k, v in OBJECTS.items() if k != key}


@pytest.mark.parametrize(
    "objects, reason, message",
    [
        (OBJECTS, "Valid", ""),
        (without(("Secret", "hf")), "Valid", ""),  # Secrets are the kubelet's to find (status.py)
        (without(("ConfigMap", "qa")), "InvalidSpec", "ConfigMap qa (spec.dataset.configMap) not found"),
        (OBJECTS | {("ConfigMap", "qa"): {"data": {"train.jsonl": ""}}}, "InvalidSpec",
         "has no key data.jsonl (spec.dataset.configMap.key)"),
        (without(("PersistentVolumeClaim", "adapters")), "InvalidSpec",
         "PersistentVolumeClaim adapters (spec.output.pvc.claimName) not found"),
        (without(("PersistentVolumeClaim", "models")), "InvalidSpec", "models (spec.model.pvc.claimName)"),
    ],
)
def test_references(objects, reason, message):
    result, asked = check(objects)
    assert result.reason == reason and message in result.message
    assert result.ok == (reason == "Valid") and not result.terminal  # a missing object may appear later
    assert all(namespace == "ml" for _, namespace, _ in asked)


def test_each_object_is_read_once_and_never_a_secret():
    result, asked = check(without(("PersistentVolumeClaim", "models")))
    assert len(asked) == len(set(asked)) == 3
    assert not [kind for kind, _, _ in asked if kind == "Secret"]


def test_a_configmaps_key_names_stay_out_of_the_message():
    # The user may not be allowed to read the ConfigMap: the operator must not tell them what it holds.
    result, _ = check(OBJECTS | {("ConfigMap", "qa"): {"data": {"customer-list.csv": "", "salaries.jsonl": ""}}})
    assert result.reason == "InvalidSpec"
    assert "customer-list" not in result.message and "salaries" not in result.message


def test_parse_spec_names_the_field():
    spec, result = parse_spec({"dataset": {"configMap": {"name": "qa"}}, "output": {"pvc": {"claimName": "a"}}})
    assert spec is None and not result.ok and result.terminal and result.reason == "InvalidSpec"
    assert "spec.dataset.configMap.key" in result.message
    spec, result = parse_spec(SPEC)
    assert spec is not None and result.ok
