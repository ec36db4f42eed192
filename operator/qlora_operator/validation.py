"""Checks of a QLoRAFinetune spec that the CRD schema and its CEL rules cannot make.

Each check is a small pure function of the spec (the camelCase dict the API server stored) that returns
None when the spec passes, or `(reason, message)`: reason `InvalidSpec`, message naming the field and what to
do. The status logic turns the first failure into `SpecValid=False` and the `Failed` phase.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from qlora_operator.api import QLoRAFinetuneSpec, Reason

Problem = tuple[str, str]
Check = Callable[[Mapping[str, Any]], "Problem | None"]

INVALID_SPEC = Reason.INVALID_SPEC.value
# The operator hands inline records to the trainer in a ConfigMap, which holds at most 1 MiB; leave room
# for the rest of the trainer's config.
MAX_INLINE_BYTES = 900 * 1024


def _section(spec: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = spec.get(name)
    return value if isinstance(value, Mapping) else {}


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", dict: "an object", str: "a string"}.get(
        type(value), type(value).__name__
    )


def check_target_modules(spec: Mapping[str, Any]) -> Problem | None:
    """lora.targetModules: a list of names or `all-linear`; the schema keeps any value here (list-or-string)."""
    value = _section(spec, "lora").get("targetModules")
    if value is None or value == "all-linear":
        return None
    if isinstance(value, str):
        return INVALID_SPEC, (
            f"spec.lora.targetModules: {value!r} is not a list; give a list of module names "
            "(e.g. [q_proj, v_proj]) or the string all-linear"
        )
    if not isinstance(value, list):
        return INVALID_SPEC, (
            f"spec.lora.targetModules: got {_kind(value)}; give a list of module names or the string all-linear"
        )
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            return INVALID_SPEC, (
                f"spec.lora.targetModules[{i}]: got {_kind(name) if name != '' else 'an empty string'}; "
                "each entry is a module name such as q_proj"
            )
    return None


def check_inline_size(spec: Mapping[str, Any]) -> Problem | None:
    """dataset.inline must fit the ConfigMap that carries it to the trainer."""
    records = _section(spec, "dataset").get("inline")
    if not records:
        return None
    size = len(json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > MAX_INLINE_BYTES:
        return INVALID_SPEC, (
            f"spec.dataset.inline: the records take {size // 1024} KiB, over the {MAX_INLINE_BYTES // 1024} KiB "
            "a ConfigMap can carry to the trainer; put them in a ConfigMap or a volume and use "
            "dataset.configMap or dataset.pvc"
        )
    return None


def _folder(pvc: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(part for part in str(pvc.get("path") or "").split("/") if part not in ("", "."))


def check_output_apart_from_model(spec: Mapping[str, Any]) -> Problem | None:
    """output.pvc must not be the base model's folder (or hold it, or sit inside it): outputs would mix in."""
    model_pvc = _section(_section(spec, "model"), "pvc")
    output_pvc = _section(_section(spec, "output"), "pvc")
    if not model_pvc or not output_pvc or model_pvc.get("claimName") != output_pvc.get("claimName"):
        return None
    model_dir, output_dir = _folder(model_pvc), _folder(output_pvc)
    shorter = min(len(model_dir), len(output_dir))
    if model_dir[:shorter] == output_dir[:shorter]:
        return INVALID_SPEC, (
            f"spec.output.pvc: path {'/'.join(output_dir) or '(the volume root)'} overlaps the base model's "
            f"folder {'/'.join(model_dir) or '(the volume root)'} on claim {output_pvc.get('claimName')}; "
            "write the adapter to a folder of its own"
        )
    return None


# How pydantic names the members of a union in an error's location; they are not fields.
_UNION_MEMBERS = {"int", "str", "float", "bool", "list", "dict"}


def _field_path(loc: tuple[Any, ...]) -> str:
    path = "spec"
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_MEMBERS and not any(c in part for c in "[('\" -"):
            path += f".{part}"
    return path


def _wrong_type(error: Mapping[str, Any]) -> bool:
    return str(error["type"]).endswith(("_type", "_parsing"))


def check_models(spec: Mapping[str, Any]) -> Problem | None:
    """The whole spec against the pydantic models: what the API server let through (an older CRD, say)."""
    try:
        QLoRAFinetuneSpec.model_validate(dict(spec))
    except ValidationError as error:
        errors = error.errors(include_url=False)
        path = _field_path(errors[0]["loc"])
        # Of a union's several errors, the member of the value's own type says the most.
        same_field = [e for e in errors if _field_path(e["loc"]) == path]
        best = next((e for e in same_field if not _wrong_type(e)), same_field[0])
        message = str(best["msg"]).removeprefix("Value error, ")
        return INVALID_SPEC, f"{path}: {message}"
    return None


# In order: the specific checks first, for their better messages, then the models as a backstop.
CHECKS: tuple[Check, ...] = (check_target_modules, check_inline_size, check_output_apart_from_model, check_models)


def validate_spec(spec: Mapping[str, Any]) -> Problem | None:
    """The first problem of the spec, or None when the operator can run it."""
    for check in CHECKS:
        problem = check(spec)
        if problem is not None:
            return problem
    return None
