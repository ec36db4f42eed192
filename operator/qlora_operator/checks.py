"""Checks the schema cannot make: the spec parses, and the ConfigMap key and PVCs it names exist.

Each check returns a `status.Check` (ok, reason, message), which maps straight onto the `SpecValid` condition.
A missing object is not terminal: the handler checks again with backoff, so creating it later starts the run.
Secrets are not read here: the operator would need `get` on every Secret of every namespace it serves, and
the kubelet already says when one is missing (CreateContainerConfigError, reported as `SecretNotFound`).
Nothing of what a named object holds reaches a message beyond whether it exists (no key names of a ConfigMap
the user may not be allowed to read).
"""

from __future__ import annotations

import asyncio

from collections.abc import Awaitable, Callable
from typing import Any

from qlora_operator.api import QLoRAFinetuneSpec, Reason
from qlora_operator.status import VALID, Check
from qlora_operator.validation import validate_spec

Getter = Callable[[str, str, str], Awaitable[dict[str, Any] | None]]  # (kind, namespace, name) -> object


def parse_spec(raw: dict[str, Any]) -> tuple[QLoRAFinetuneSpec | None, Check]:
    """The typed spec, or why it is invalid (validation.py's checks; terminal: only a spec change helps)."""
    problem = validate_spec(raw)
    if problem is not None:
        return None, Check(ok=False, reason=problem[0], message=problem[1], terminal=True)
    return QLoRAFinetuneSpec.model_validate(raw), VALID


async def check_references(spec: QLoRAFinetuneSpec, namespace: str, get: Getter) -> Check:
    """Whether the objects the spec names exist; the first missing one, with what to do about it.

    The objects are read all at once (one round trip of waiting, not one per object).
    """
    source = spec.dataset.config_map
    claims = {spec.output.pvc.claim_name: "spec.output.pvc"}
    if spec.dataset.pvc is not None:
        claims.setdefault(spec.dataset.pvc.claim_name, "spec.dataset.pvc")
    if spec.model.pvc is not None:
        claims.setdefault(spec.model.pvc.claim_name, "spec.model.pvc")
    wanted = [("PersistentVolumeClaim", claim) for claim in claims]
    if source is not None:
        wanted.append(("ConfigMap", source.name))
    found = dict(zip(wanted, await asyncio.gather(*(get(kind, namespace, name) for kind, name in wanted))))

    if source is not None:
        config_map = found[("ConfigMap", source.name)]
        if config_map is None:
            return Check(False, Reason.INVALID_SPEC.value,
                         f"ConfigMap {source.name} (spec.dataset.configMap) not found in namespace {namespace}")
        keys = set(config_map.get("data") or {}) | set(config_map.get("binaryData") or {})
        if source.key not in keys:
            return Check(False, Reason.INVALID_SPEC.value,
                         f"ConfigMap {source.name} has no key {source.key} (spec.dataset.configMap.key)")
    for claim, field in claims.items():
        if found[("PersistentVolumeClaim", claim)] is None:
            return Check(False, Reason.INVALID_SPEC.value,
                         f"PersistentVolumeClaim {claim} ({field}.claimName) not found in namespace {namespace}")
    return VALID
