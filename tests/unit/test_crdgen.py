"""The generated CRD: current with the models, structural, bounded, described, and its defaults the models'."""

from __future__ import annotations

import copy
from typing import Any, Literal

import pytest
import yaml
from pydantic import Field

from qlora_operator import api, crdgen
from qlora_trainer.config import ApiModel

CRD = crdgen.crd()
VERSION = CRD["spec"]["versions"][0]
ROOT = VERSION["schema"]["openAPIV3Schema"]
SPEC = ROOT["properties"]["spec"]
STATUS = ROOT["properties"]["status"]


def nodes(schema: dict, path: str = ""):
    """Every schema node with its path, the root first."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        yield from nodes(schema["items"], f"{path}[]")


@pytest.mark.parametrize("path", crdgen.crd_paths(), ids=lambda p: str(p.relative_to(crdgen.REPO_ROOT)))
def test_committed_crd_is_current(path):
    assert path.read_text(encoding="utf-8") == crdgen.render(), f"{path} is stale: run `make crds` and commit it"


def test_check_flag_reports_a_stale_file(tmp_path):
    target = tmp_path / "crd.yaml"
    assert crdgen.main(["--check", "--output", str(target)]) == 1
    assert crdgen.main(["--output", str(target)]) == 0
    assert crdgen.main(["--check", "--output", str(target)]) == 0
    assert yaml.safe_load(target.read_text(encoding="utf-8")) == CRD


def test_names_scope_subresource_and_columns():
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "qlorafinetunes.qlora.io" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "QLoRAFinetune",
        "listKind": "QLoRAFinetuneList",
        "plural": "qlorafinetunes",
        "singular": "qlorafinetune",
        "shortNames": ["qft", "qlora"],
        "categories": ["all", "ml"],
    }
    assert VERSION["name"] == "v1alpha1" and VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Progress", "Loss", "Epoch", "ETA", "Model", "Age"]
    assert columns["Model"]["priority"] == 1 and columns["Age"]["type"] == "date"
    for column in columns.values():
        head = column["jsonPath"].split(".")[1]
        if head == "status":  # every status column points at a field of the schema
            assert column["jsonPath"].split(".")[2] in STATUS["properties"]


def test_schema_is_structural():
    for path, node in nodes(ROOT):
        assert not {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "const", "nullable"} & set(node), path
        typed = node.get("type") or node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        assert typed, f"{path} has no type"
        if node.get("type") == "object":
            assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            assert not path.startswith(".status"), f"{path}: status takes no defaults"


def test_every_field_is_described():
    undescribed = [
        path for path, node in nodes(SPEC, ".spec") if not path.endswith(("]", "*")) and not node.get("description")
    ]
    undescribed += [p for p, n in nodes(STATUS, ".status") if not p.endswith(("]", "*")) and not n.get("description")]
    assert undescribed == []
    assert "rank" in SPEC["properties"]["lora"]["properties"]["r"]["description"].lower()


def test_strings_and_lists_are_bounded_for_cel_cost():
    for path, node in [*nodes(SPEC, ".spec"), *nodes(STATUS, ".status")]:
        if node.get("type") == "string" and "enum" not in node and "format" not in node:
            assert "maxLength" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, path


def test_bounds_of_api_md():
    props = {name: SPEC["properties"][name]["properties"] for name in ("lora", "training", "dataset", "resources")}
    assert (props["lora"]["r"]["minimum"], props["lora"]["r"]["maximum"]) == (1, 1024)
    assert props["lora"]["alpha"]["minimum"] == 0 and props["lora"]["alpha"]["exclusiveMinimum"] is True
    assert props["lora"]["dropout"]["maximum"] == 1 and props["lora"]["dropout"]["exclusiveMaximum"] is True
    lr = props["training"]["learningRate"]
    assert (lr["minimum"], lr["exclusiveMinimum"], lr["maximum"]) == (0, True, 1)
    assert (props["training"]["maxLength"]["minimum"], props["training"]["maxLength"]["maximum"]) == (16, 131072)
    assert props["dataset"]["evalFraction"]["maximum"] == 0.5
    assert props["dataset"]["inline"]["maxItems"] == 500
    assert props["resources"]["gpus"]["minimum"] == 0 and props["resources"]["nodes"]["minimum"] == 1
    assert SPEC["properties"]["quantization"]["properties"]["bits"]["enum"] == [4, 8]
    assert set(SPEC["required"]) == {"dataset", "output"}


def test_no_schema_default_for_what_the_operator_decides():
    model = SPEC["properties"]["model"]["properties"]
    assert "default" not in model["name"] and "default" not in SPEC["properties"]["runtime"]["properties"]["image"]
    # a defaulted type would break the 4-bit-only rule for every 8-bit resource
    assert "default" not in SPEC["properties"]["quantization"]["properties"]["type"]


def apply_defaults(schema: dict, value: Any) -> Any:
    """What the API server's defaulting does: absent fields with a default get it, recursively."""
    if not isinstance(value, dict) or "properties" not in schema:
        if isinstance(value, list) and "items" in schema:
            return [apply_defaults(schema["items"], v) for v in value]
        return value
    out = dict(value)
    for name, child in schema["properties"].items():
        if name not in out and "default" in child:
            out[name] = copy.deepcopy(child["default"])
        if name in out:
            out[name] = apply_defaults(child, out[name])
    return out


@pytest.mark.parametrize(
    "spec",
    [
        {"dataset": {"configMap": {"name": "qa", "key": "data.jsonl"}}, "output": {"pvc": {"claimName": "out"}}},
        {
            "model": {"tokenSecretRef": {"name": "hf"}},
            "dataset": {"hf": {"name": "org/data"}},
            "quantization": {"bits": 8},
            "output": {"pvc": {"claimName": "out"}},
            "runtime": {"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        },
    ],
)
def test_api_server_defaults_are_the_models_defaults(spec):
    assert apply_defaults(SPEC, spec) == api.QLoRAFinetuneSpec.model_validate(spec).to_wire()


def rules_of(node: dict) -> dict[str, dict]:
    return {r.get("fieldPath", ""): r for r in node.get("x-kubernetes-validations", [])}


def test_cel_rules_that_tie_fields_together():
    dataset_rules = [r["rule"] for r in SPEC["properties"]["dataset"]["x-kubernetes-validations"]]
    assert all(all(f"has(self.{s})" in r for s in api.DATASET_SOURCES) for r in dataset_rules)
    assert len(dataset_rules) == 2
    quantization = rules_of(SPEC["properties"]["quantization"])[".type"]
    assert quantization["rule"] == "!has(self.type) || self.bits == 4"
    training = rules_of(SPEC["properties"]["training"])
    assert "batchSize" in training[".batchSize"]["rule"] and "'paged_adamw_8bit'" in training[".optimizer"]["rule"]
    env = SPEC["properties"]["runtime"]["properties"]["env"]
    assert env["x-kubernetes-list-map-keys"] == ["name"]
    assert "secretKeyRef" in rules_of(env["items"])[".value"]["message"]


def test_spec_is_immutable_but_for_the_named_fields():
    immutable = rules_of(SPEC)
    for field in ("model", "dataset", "quantization", "lora", "training", "resources", "output"):
        rule = immutable[f".{field}"]
        assert rule["rule"] == (
            f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
        )
        assert "metadata.name" in rule["message"] and f"spec.{field}" in rule["message"]
    runtime_fields = set(SPEC["properties"]["runtime"]["properties"])
    checked = {path.removeprefix(".runtime.") for path in immutable if path.startswith(".runtime.")}
    assert checked == runtime_fields - {"ttlSecondsAfterFinished", "activeDeadlineSeconds"}
    assert ".suspend" not in immutable and ".runtime" not in immutable


def test_unions_become_kubernetes_shapes():
    batch = SPEC["properties"]["training"]["properties"]["batchSize"]
    assert batch["x-kubernetes-int-or-string"] is True and "type" not in batch and batch["default"] == 2
    assert batch["x-kubernetes-validations"][0]["rule"] == "type(self) == int || self in ['auto']"
    targets = SPEC["properties"]["lora"]["properties"]["targetModules"]
    assert targets["x-kubernetes-preserve-unknown-fields"] is True and "type" not in targets
    assert targets["pattern"] == "^(all-linear)$" and targets["items"]["type"] == "string"
    memory = SPEC["properties"]["resources"]["properties"]["memory"]
    assert memory["x-kubernetes-int-or-string"] is True and memory["pattern"] == api.QUANTITY
    affinity = SPEC["properties"]["resources"]["properties"]["affinity"]
    assert affinity == {
        "description": affinity["description"], "type": "object", "x-kubernetes-preserve-unknown-fields": True
    }


def test_status_conditions_are_a_map_keyed_by_type():
    conditions = STATUS["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]
    assert STATUS["properties"]["startTime"]["format"] == "date-time"


def test_a_union_without_a_structural_form_is_refused():
    class Odd(ApiModel):
        value: int | list[int] = Field(description="either")

    with pytest.raises(crdgen.SchemaError, match=r"\.value"):
        crdgen.model_schema(Odd)


def test_optional_fields_are_not_nullable_and_exclusive_bounds_are_booleans():
    class Sample(ApiModel):
        ratio: float | None = Field(None, gt=0, lt=2, description="a ratio")
        mode: Literal["x"] = Field("x", description="one word")

    schema = crdgen.model_schema(Sample)
    assert schema["properties"]["ratio"] == {
        "description": "a ratio", "type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 2,
        "exclusiveMaximum": True,
    }
    assert schema["properties"]["mode"]["enum"] == ["x"]
