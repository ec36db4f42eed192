"""Generate the QLoRAFinetune CRD from the pydantic models of `api`.

`python -m qlora_operator.crdgen` writes crds/qlorafinetunes.qlora.io.yaml (`--check` only compares).

pydantic writes JSON Schema 2020-12; the API server wants a structural OpenAPI v3.0 schema. `structural()`
bridges the two, small and strict: $refs inlined, titles dropped, numeric exclusive bounds made boolean,
`const` made `enum`, free strings and lists given a length bound (so CEL cost estimates pass), and unions
turned into the two shapes Kubernetes can hold:

- `int | "word"` and quantities: `x-kubernetes-int-or-string`, with a CEL rule naming the allowed words;
- `list | "word"` (lora.targetModules): a node of no type that keeps any value, whose `items` and `pattern`
  still check a list's items and a string's value; other shapes are the operator's to refuse (validation).

`X | None` is not nullable: the API server drops a null of a non-nullable field as if it were absent, which
is what None means in the models. Any other union raises, so a new field cannot slip in unstructured.
(kube-custom-resource does this step only for models written with its own types; ours are the trainer's.)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from qlora_operator import api

# Bounds for strings, lists and maps the models leave open.
DEFAULT_MAX_LENGTH = 1024
DEFAULT_MAX_ITEMS = 64
DEFAULT_MAX_PROPERTIES = 64

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / f"{api.CRD_NAME}.yaml"
# The Helm chart ships the same file (Helm installs crds/ before the templates).
CHART_CRD_PATH = REPO_ROOT / "charts" / "qlora-operator" / "crds" / f"{api.CRD_NAME}.yaml"


def crd_paths() -> list[Path]:
    """Where `make crds` writes the CRD: crds/, and the chart's copy where the chart is."""
    return [CRD_PATH] + ([CHART_CRD_PATH] if CHART_CRD_PATH.parent.parent.is_dir() else [])

_DROP = {"title", "$defs"}
_VALIDATIONS = "x-kubernetes-validations"


class SchemaError(ValueError):
    """A model field has a shape the CRD schema cannot hold."""


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with the keys of `over` on top; CEL rules of both are kept."""
    merged = {**base, **over}
    if _VALIDATIONS in base and _VALIDATIONS in over:
        merged[_VALIDATIONS] = base[_VALIDATIONS] + over[_VALIDATIONS]
    return merged


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = _merge(node.pop("allOf")[0], node)
    if "$ref" in node:
        target = defs[node.pop("$ref").removeprefix("#/$defs/")]
        node = _merge(_resolve(target, defs), node)
    return node


def _union(node: dict[str, Any], choices: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The structural form of a union that is not just `X | None`."""
    types = {choice.get("type") for choice in choices}
    words = [w for choice in choices if choice.get("type") == "string" for w in _words(choice)]
    if types == {"integer", "string"}:
        string = next(c for c in choices if c["type"] == "string")
        node["x-kubernetes-int-or-string"] = True
        for key in ("pattern", "maxLength"):
            if key in string:
                node[key] = string[key]
        if words:
            allowed = ", ".join(f"'{w}'" for w in words)
            node.setdefault(_VALIDATIONS, []).insert(
                0,
                {
                    "rule": f"type(self) == int || self in [{allowed}]",
                    "message": f"must be a whole number or {' or '.join(words)}",
                },
            )
        return node
    if types == {"array", "string"} and words:
        array = next(c for c in choices if c["type"] == "array")
        node["x-kubernetes-preserve-unknown-fields"] = True
        # `pattern` applies to strings only and `items` to lists only, so each checks its own shape.
        node["pattern"] = "^(" + "|".join(words) + ")$"
        node["items"] = array["items"]
        node["maxItems"] = array.get("maxItems", DEFAULT_MAX_ITEMS)
        return node
    raise SchemaError(f"{path}: a union of {sorted(map(str, types))} has no structural schema")


def _words(choice: dict[str, Any]) -> list[str]:
    if "const" in choice:
        return [choice["const"]]
    return list(choice.get("enum", []))


def structural(node: dict[str, Any], defs: dict[str, Any], path: str = "", defaults: bool = True) -> dict[str, Any]:
    """The structural OpenAPI v3.0 schema of one pydantic JSON-schema node."""
    node = {k: v for k, v in _resolve(node, defs).items() if k not in _DROP}
    if node.get("default", ...) is None or not defaults:
        node.pop("default", None)

    if "anyOf" in node:
        choices = [_resolve(c, defs) for c in node.pop("anyOf") if c.get("type") != "null"]
        if len(choices) == 1:
            node = _merge(choices[0], node)
        else:
            node = _union(node, choices, path)

    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[inclusive] = node[bound]
            node[bound] = True

    kind = node.get("type")
    if kind == "object":
        extra = node.pop("additionalProperties", None)
        if "properties" in node:
            node["properties"] = {
                name: structural(child, defs, f"{path}.{name}", defaults)
                for name, child in node["properties"].items()
            }
        elif isinstance(extra, dict):
            node["additionalProperties"] = structural(extra, defs, f"{path}.*", defaults)
            node.setdefault("maxProperties", DEFAULT_MAX_PROPERTIES)
        else:
            node["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        node["items"] = structural(node["items"], defs, f"{path}[]", defaults)
        node.setdefault("maxItems", DEFAULT_MAX_ITEMS)
    elif kind == "string" and "enum" not in node and "format" not in node:
        node.setdefault("maxLength", DEFAULT_MAX_LENGTH)
    elif kind is None and not node.get("x-kubernetes-int-or-string"):
        if "items" in node:
            node["items"] = structural(node["items"], defs, f"{path}[]", defaults)
        node["x-kubernetes-preserve-unknown-fields"] = True
    return _ordered(node, path)


# Keys in the order a person reads them in the YAML file.
_ORDER = (
    "description", "type", "format", "default", "enum", "minimum", "exclusiveMinimum", "maximum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "maxProperties",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "required", "properties", "additionalProperties", "items", _VALIDATIONS,
)


_RULE_ORDER = ("rule", "message", "fieldPath", "reason")


def _ordered(node: dict[str, Any], path: str) -> dict[str, Any]:
    unknown = set(node) - set(_ORDER) - _DROP
    if unknown:
        raise SchemaError(f"{path or 'root'}: unexpected schema keys {sorted(unknown)}")
    if _VALIDATIONS in node:
        node[_VALIDATIONS] = [{k: entry[k] for k in _RULE_ORDER if k in entry} for entry in node[_VALIDATIONS]]
    return {key: node[key] for key in _ORDER if key in node}


def model_schema(model: type, defaults: bool = True) -> dict[str, Any]:
    """The structural schema of a pydantic model, camelCase field names."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}), "", defaults)


def openapi_schema() -> dict[str, Any]:
    """The CRD version's openAPIV3Schema."""
    spec = model_schema(api.QLoRAFinetuneSpec)
    # Status is written by the operator: no defaults, or the API server would invent values it never saw.
    status = model_schema(api.QLoRAFinetuneStatus, defaults=False)
    return {
        "description": api.QLoRAFinetune.__doc__,
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"description": "qlora.io/v1alpha1", "type": "string"},
            "kind": {"description": "QLoRAFinetune", "type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": api.CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "qlora-operator"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": api.LIST_KIND,
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(list(api.PRINTER_COLUMNS)),
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `python -m qlora_operator.crdgen` (make crds) from operator/qlora_operator/api.py. Do not edit.\n"


class _Dumper(yaml.SafeDumper):
    """Writes shared subtrees out in full: no YAML anchors for a reader to chase."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    """The CRD file's text."""
    return HEADER + yaml.dump(crd(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_operator.crdgen", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, action="append", help="where to write the CRD (default: crds/ and the chart's crds/)"
    )
    parser.add_argument("--check", action="store_true", help="only report whether the files are current")
    args = parser.parse_args(argv)
    text = render()
    stale = 0
    for path in args.output or crd_paths():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                print(f"{path} is out of date: run `make crds`", file=sys.stderr)
                stale += 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
