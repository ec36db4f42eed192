"""Checks the schema cannot make: the spec parses, and the Secret, ConfigMap key and PVCs it names exist.

Each check returns a `status.Check` (ok, reason, message), which maps straight onto the `SpecValid` condition.
A missing object is not terminal: the handler checks again with backoff, so creating it later starts the run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from qlora_operator.api import QLoRAFinetuneSpec, Reason
from qlora_operator.status import VALID, Check

Getter = Callable[[str, str, str], Awaitable[dict[str, Any] | None]]  # (kind, namespace, name) -> object


def parse_spec(raw: dict[str, Any]) -> tuple[QLoRAFinetuneSpec | None, Check]:
    """The typed spec, or why it is invalid (terminal: only a spec change helps)."""
    try:
        spec = QLoRAFinetuneSpec.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors()[:3]:
            where = ".".join(str(part) for part in ("spec", *e["loc"]))
            problems.append(f"{where}: {e['msg']}")
        return None, Check(ok=False, reason=Reason.INVALID_SPEC.value, message="; ".join(problems), terminal=True)
    return spec, VALID


async def check_references(spec: QLoRAFinetuneSpec, namespace: str, get: Getter) -> Check:
    """Whether the objects the spec names exist; the first missing one, with what to do about it."""
    token = spec.model.token_secret_ref
    if token is not None:
        secret = await get("Secret", namespace, token.name)
        if secret is None:
            return Check(False, Reason.SECRET_NOT_FOUND.value,
                         f"Secret {token.name} (spec.model.tokenSecretRef) not found in namespace {namespace}; "
                         f"create it with key {token.key}")
        if token.key not in (secret.get("data") or {}) and token.key not in (secret.get("stringData") or {}):
            return Check(False, Reason.SECRET_NOT_FOUND.value,
                         f"Secret {token.name} has no key {token.key} (spec.model.tokenSecretRef.key)")
    source = spec.dataset.config_map
    if source is not None:
        config_map = await get("ConfigMap", namespace, source.name)
        if config_map is None:
            return Check(False, Reason.INVALID_SPEC.value,
                         f"ConfigMap {source.name} (spec.dataset.configMap) not found in namespace {namespace}")
        keys = set(config_map.get("data") or {}) | set(config_map.get("binaryData") or {})
        if source.key not in keys:
            return Check(False, Reason.INVALID_SPEC.value,
                         f"ConfigMap {source.name} has no key {source.key} (spec.dataset.configMap.key); "
                         f"it has: {', '.join(sorted(keys)) or 'no keys'}")
    claims = [("spec.output.pvc", spec.output.pvc.claim_name)]
    if spec.dataset.pvc is not None:
        claims.append(("spec.dataset.pvc", spec.dataset.pvc.claim_name))
    if spec.model.pvc is not None:
        claims.append(("spec.model.pvc", spec.model.pvc.claim_name))
    for field, claim in claims:
        if await get("PersistentVolumeClaim", namespace, claim) is None:
            return Check(False, Reason.INVALID_SPEC.value,
                         f"PersistentVolumeClaim {claim} ({field}.claimName) not found in namespace {namespace}")
    return VALID
