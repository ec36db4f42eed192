"""Kubernetes I/O of the operator: a thin async REST client (dicts in, dicts out) and the few calls it makes.

Every API call the operator makes (beyond kopf's own watches) is a method here, so the Helm chart's RBAC can be
read off this file: get configmaps, persistentvolumeclaims, jobs (never secrets); list pods and jobs (at start, and
now and then to recover from a lost watch), list events (a Job's FailedCreate); create configmaps, services,
jobs, events; patch configmaps, jobs, and qlorafinetunes/status.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig
from kubernetes.aio.client.exceptions import ApiException

from qlora_operator.api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "qlora-operator"
REQUEST_TIMEOUT = 30.0


class ApiError(Exception):
    """An API call failed; `status` is the HTTP status (0 when none came back)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def transient(self) -> bool:
        """Worth retrying as is: a conflict, throttling, a timeout, or a server error."""
        return self.status in (0, 409, 429) or self.status >= 500


# Kinds the operator reads or writes: kind -> (API prefix, plural).
_PATHS = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    "QLoRAFinetune": (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


def path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    """The REST path of a kind's collection in a namespace (all namespaces when None), or of one object."""
    prefix, plural = _PATHS[kind]
    out = f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        out += f"/{quote(name, safe='')}"
    if sub:
        out += f"/{sub}"
    return out


class Kube:
    """One shared async API client for the operator's own calls."""

    def __init__(self, api_client: kclient.ApiClient):
        self._api = api_client
        # Called with (HTTP method, seconds, HTTP status or 0) after each call (the operator's metrics).
        self.observe: Callable[[str, float, int], None] | None = None

    @classmethod
    async def connect(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
        configuration = kclient.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kconfig.load_incluster_config(client_configuration=configuration)
        else:
            await kconfig.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                           client_configuration=configuration)
        configuration.connection_pool_maxsize = 32
        api = kclient.ApiClient(configuration)
        api.user_agent = FIELD_MANAGER
        return cls(api)

    async def close(self) -> None:
        await self._api.close()

    async def request(self, method: str, resource_path: str, body: Any = None, *,
                      content_type: str = "application/json", query: dict[str, str] | None = None) -> Any:
        """One REST call; the decoded JSON answer. Raises ApiError on any failure."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = await self._api.param_serialize(
            method=method, resource_path=resource_path, header_params=headers, body=body,
            query_params=list((query or {}).items()), auth_settings=["BearerToken"])
        started, status = time.monotonic(), 0
        try:
            response = await self._api.call_api(*params, _request_timeout=REQUEST_TIMEOUT)
            data = await response.read()
            status = response.status
        except ApiException as err:
            status = err.status or 0
            raise _api_error(err.status or 0, err.reason or "", err.body) from None
        except (OSError, TimeoutError, aiohttp.ClientError) as err:  # refused/reset, DNS, timeouts, disconnects
            raise ApiError(0, type(err).__name__, str(err)) from None
        finally:
            if self.observe is not None:
                self.observe(method, time.monotonic() - started, status)
        if not 200 <= response.status < 300:
            raise _api_error(response.status, response.reason or "", data)
        return json.loads(data) if data else None

    # ------------------------------------------------------------------ the calls the operator makes

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path(kind, namespace, name))
        except ApiError as err:
            if err.not_found:
                return None
            raise

    async def list(self, kind: str, namespace: str | None, label_selector: str | None = None,
                   field_selector: str | None = None) -> list[dict[str, Any]]:
        """Objects of a kind matching the selectors, in one namespace or all (None)."""
        items: list[dict[str, Any]] = []
        query = {"limit": "500"}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        while True:
            page = await self.request("GET", path(kind, namespace), query=query)
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            query["continue"] = token

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self.request("POST", path(obj["kind"], meta["namespace"]), obj,
                                  query={"fieldManager": FIELD_MANAGER})

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                    sub: str | None = None) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386): null deletes a field, lists are replaced whole."""
        return await self.request("PATCH", path(kind, namespace, name, sub), patch, content_type=MERGE_PATCH,
                                  query={"fieldManager": FIELD_MANAGER})

    async def patch_status(self, namespace: str, name: str, status_patch: dict[str, Any],
                           resource_version: str | None = None) -> dict[str, Any]:
        """Patch a QLoRAFinetune's status; with `resource_version`, only that version of the object (409
        otherwise: it changed, or the name now stands for another object)."""
        body: dict[str, Any] = {"status": status_patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.patch("QLoRAFinetune", namespace, name, body, sub="status")

    async def job_events(self, namespace: str, name: str, uid: str | None, reason: str) -> list[dict[str, Any]]:
        """The Events with `reason` about one Job (the Job controller's, e.g. FailedCreate)."""
        fields = {"involvedObject.kind": "Job", "involvedObject.name": name, "involvedObject.uid": uid,
                  "reason": reason}
        selector = ",".join(f"{k}={v}" for k, v in fields.items() if v)
        return await self.list("Event", namespace, field_selector=selector)

    async def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about `involved` (a resource body), as `kubectl describe` shows it."""
        meta = involved["metadata"]
        now = datetime.now(timezone.utc)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": f"{GROUP}/operator",
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self.request("POST", path("Event", meta["namespace"]), event)


def _api_error(status: int, reason: str, body: Any) -> ApiError:
    message = ""
    try:
        document = json.loads(body) if body else {}
        message = document.get("message", "") if isinstance(document, dict) else ""
    except (TypeError, ValueError):
        message = (body.decode(errors="replace") if isinstance(body, bytes) else str(body or ""))[:300]
    return ApiError(status, reason, message)
