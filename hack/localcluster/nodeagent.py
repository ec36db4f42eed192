#!/usr/bin/env python3
"""The local cluster's node agent: what the kubelet and the container runtime do, and nothing more.

It registers a Node (labels, CPU, memory and `nvidia.com/gpu` capacity) that is Ready and renews its Lease;
runs each pod bound to it as local processes, each container in its own mount namespace (podlaunch.py) with
its volumes at their mount paths and its own loopback address as pod IP; reports container states, exit
codes, reasons and termination messages in the pod's status; stops pods on deletion (SIGTERM, grace period,
SIGKILL); enforces `activeDeadlineSeconds`; treats images it is not configured to run as pull failures;
provisions PersistentVolumeClaims of its default StorageClass as folders; and serves container logs over
HTTPS so `kubectl logs` works.

The deciding is done by pure functions of plain dicts (the API's JSON), tested in tests/unit/test_nodeagent.py:
`match_image`, `container_env`, `container_argv`, `volume_files`, `container_mounts`, `terminated_state`,
`termination_message`, `pod_phase`, `pod_status`. The classes below them only do I/O.

Images: a YAML/JSON file (`--images`) lists rules `{pattern, env, entrypoint, cmd, workingDir}`; the first
rule whose fnmatch pattern matches a container's image says how to run it. The file is re-read when it
changes, so tests can add rules while the cluster runs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fnmatch
import http.server
import json
import os
import platform
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROVISIONER = "localcluster.io/local-path"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def resource_version(obj: dict) -> int:
    """etcd's revision behind an object's resourceVersion, to order what a list and a watch said."""
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


def now_iso(t: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_iso(t: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


# =============================================================================================== pure part

class ConfigError(Exception):
    """A container cannot be created yet (a missing Secret, ConfigMap or key): CreateContainerConfigError."""


@dataclass(frozen=True)
class ImageRule:
    pattern: str
    env: dict = field(default_factory=dict)
    entrypoint: tuple = ()
    cmd: tuple = ()
    workingDir: str = ""
    # Host folders that stand for the image's own files (the repo, the venv): a volume mounted over one
    # of their parents (an emptyDir at /tmp, say) must not hide them, as it could not in a real image.
    contents: tuple = ()


def parse_image_rules(data: dict) -> list[ImageRule]:
    return [ImageRule(pattern=r["pattern"], env=dict(r.get("env") or {}), entrypoint=tuple(r.get("entrypoint") or ()),
                      cmd=tuple(r.get("cmd") or ()), workingDir=r.get("workingDir") or "",
                      contents=tuple(r.get("contents") or ()))
            for r in data.get("images") or []]


def match_image(image: str, rules: list[ImageRule]) -> ImageRule | None:
    """The first rule whose pattern matches; None means the node cannot "pull" this image."""
    return next((r for r in rules if fnmatch.fnmatchcase(image, r.pattern)), None)


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known variables are replaced, unknown ones kept, `$$` escapes `$`."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, value)


def quantity(q: str | int | float) -> float:
    """A resource quantity ("500m", "2Gi", "1e3", 4) as a number of base units."""
    s = str(q).strip()
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    for suf in sorted(suffixes, key=len, reverse=True):
        if s.endswith(suf) and not s.endswith("e" + suf):
            return float(s[: -len(suf)]) * suffixes[suf]
    return float(s)


def field_value(pod: dict, path: str) -> str:
    """A downward-API fieldRef of the pod (metadata.name, status.podIP, metadata.labels['x'], ...)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""), "status.hostIP": status.get("hostIP", ""),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs") or []),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs") or []),
        "metadata.labels": "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("labels") or {}).items())),
        "metadata.annotations": "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("annotations") or {}).items())),
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return simple[path]


def resource_value(pod: dict, ref: dict, node_allocatable: dict) -> str:
    """A resourceFieldRef: the container's limit or request (limits default to node allocatable)."""
    containers = pod["spec"].get("containers", []) + pod["spec"].get("initContainers", [])
    name = ref.get("containerName")
    container = next((c for c in containers if c["name"] == name), containers[0]) if name else containers[0]
    kind, _, res = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(res)
    if value is None and kind == "limits":
        value = node_allocatable.get(res, "0")
    if value is None:
        value = "0"
    divisor = quantity(ref.get("divisor") or "1")
    amount = quantity(value) / divisor
    return str(int(-(-amount // 1)))  # the kubelet rounds up


def _decoded(obj: dict | None) -> dict[str, bytes] | None:
    """A Secret's or ConfigMap's data as bytes, or None when the object does not exist."""
    if obj is None:
        return None
    out = {k: v.encode() for k, v in (obj.get("stringData") or {}).items()}
    if obj.get("kind") == "Secret":
        out.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
    else:
        out.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def _ref(kind: str, namespace: str, ref: dict, key: str, lookup) -> str | None:
    data = _decoded(lookup(kind, namespace, ref["name"]))
    optional = ref.get("optional", False)
    if data is None:
        if optional:
            return None
        raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
    if key not in data:
        if optional:
            return None
        raise ConfigError(f"couldn't find key {key} in {kind} {namespace}/{ref['name']}")
    return data[key].decode(errors="replace")


def service_env(api_port: int) -> dict[str, str]:
    """The `kubernetes` Service's variables; they point straight at the API server on loopback."""
    return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(api_port), "KUBERNETES_PORT": f"tcp://127.0.0.1:{api_port}",
            f"KUBERNETES_PORT_{api_port}_TCP": f"tcp://127.0.0.1:{api_port}"}


def container_env(pod: dict, container: dict, rule: ImageRule, lookup, api_port: int,
                  node_allocatable: dict | None = None) -> dict[str, str]:
    """The process environment, resolved as the kubelet does.

    Lowest to highest priority: image env, defaults (HOME, HOSTNAME), the `kubernetes` Service variables,
    `envFrom` (in order), `env` (in order, each `$(VAR)`-expanded against what is defined before it).
    `lookup(kind, namespace, name)` returns a Secret/ConfigMap dict or None; a missing required one raises
    ConfigError."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {"HOME": "/root", **rule.env, "HOSTNAME": pod["metadata"]["name"]}
    env.update(service_env(api_port))  # always, like the kubelet's `kubernetes` Service variables
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in source:
                continue
            ref = source[key]
            data = _decoded(lookup(kind, ns, ref["name"]))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
            env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        src = var["valueFrom"]
        if "secretKeyRef" in src:
            value = _ref("Secret", ns, src["secretKeyRef"], src["secretKeyRef"]["key"], lookup)
        elif "configMapKeyRef" in src:
            value = _ref("ConfigMap", ns, src["configMapKeyRef"], src["configMapKeyRef"]["key"], lookup)
        elif "fieldRef" in src:
            value = field_value(pod, src["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in src:
            value = resource_value(pod, {"containerName": container["name"], **src["resourceFieldRef"]},
                                   node_allocatable or {})
        else:
            raise ConfigError(f"unsupported valueFrom for {name}: {sorted(src)}")
        if value is not None:
            env[name] = value
    return env


def container_argv(container: dict, rule: ImageRule, env: dict[str, str]) -> list[str]:
    """Docker's ENTRYPOINT/CMD rules with Kubernetes' command/args on top, `$(VAR)`-expanded."""
    command, args = container.get("command"), container.get("args")
    if command:
        argv = list(command) + list(args or [])
    elif args:
        argv = list(rule.entrypoint) + list(args)
    else:
        argv = list(rule.entrypoint) + list(rule.cmd)
    if not argv:
        raise ConfigError(f"no command specified and image {container['image']!r} has no entrypoint or cmd")
    return [expand(a, env) for a in argv]


def _items(data: dict[str, bytes], items: list | None, default_mode: int | None) -> dict[str, tuple[bytes, int]]:
    mode = default_mode if default_mode is not None else 0o644
    if not items:
        return {k: (v, mode) for k, v in data.items()}
    out = {}
    for it in items:
        if it["key"] not in data:
            raise ConfigError(f"couldn't find key {it['key']}")
        out[it["path"]] = (data[it["key"]], it.get("mode", mode))
    return out


def volume_files(pod: dict, volume: dict, lookup, token_for=None,
                 node_allocatable: dict | None = None) -> dict[str, tuple[bytes, int]] | None:
    """The files (relative path -> (content, mode)) of a configMap/secret/projected/downwardAPI volume;
    None for volume kinds that are folders (emptyDir, persistentVolumeClaim, hostPath).

    `token_for(audience, expirationSeconds)` returns a service-account token for projected volumes."""
    ns = pod["metadata"]["namespace"]

    def from_object(kind: str, src: dict, name_key: str, default_mode) -> dict:
        data = _decoded(lookup(kind, ns, src[name_key]))
        if data is None:
            if src.get("optional"):
                return {}
            raise ConfigError(f'{kind.lower()} "{src[name_key]}" not found')
        return _items(data, src.get("items"), default_mode)

    def downward(src: dict, default_mode) -> dict:
        out = {}
        for it in src.get("items") or []:
            if "fieldRef" in it:
                value = field_value(pod, it["fieldRef"]["fieldPath"])
            else:
                value = resource_value(pod, it["resourceFieldRef"], node_allocatable or {})
            out[it["path"]] = (value.encode(), it.get("mode", default_mode if default_mode is not None else 0o644))
        return out

    if "configMap" in volume:
        return from_object("ConfigMap", volume["configMap"], "name", volume["configMap"].get("defaultMode"))
    if "secret" in volume:
        return from_object("Secret", volume["secret"], "secretName", volume["secret"].get("defaultMode"))
    if "downwardAPI" in volume:
        return downward(volume["downwardAPI"], volume["downwardAPI"].get("defaultMode"))
    if "projected" in volume:
        mode = volume["projected"].get("defaultMode")
        out: dict = {}
        for src in volume["projected"].get("sources") or []:
            if "configMap" in src:
                out.update(from_object("ConfigMap", src["configMap"], "name", mode))
            elif "secret" in src:
                out.update(from_object("Secret", src["secret"], "name", mode))
            elif "downwardAPI" in src:
                out.update(downward(src["downwardAPI"], mode))
            elif "serviceAccountToken" in src:
                t = src["serviceAccountToken"]
                token = token_for(t.get("audience"), t.get("expirationSeconds", 3600))
                out[t["path"]] = (token.encode(), mode if mode is not None else 0o644)
            else:
                raise ConfigError(f"unsupported projected source {sorted(src)}")
        return out
    return None


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    readOnly: bool = False


def container_mounts(container: dict, volume_dirs: dict[str, tuple[str, bool]], termination_file: str) -> list[Mount]:
    """Bind mounts for a container: each volumeMount (with subPath) and the termination-message file.
    `volume_dirs` maps a volume name to (host folder, read-only)."""
    mounts = []
    for vm in container.get("volumeMounts") or []:
        if vm["name"] not in volume_dirs:
            raise ConfigError(f"volume {vm['name']!r} is not defined in the pod")
        source, ro = volume_dirs[vm["name"]]
        if vm.get("subPath"):
            source = os.path.join(source, vm["subPath"])
        mounts.append(Mount(source, vm["mountPath"], bool(vm.get("readOnly") or ro)))
    mounts.append(Mount(termination_file, container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH))
    return mounts


def hosts_file(pod: dict, ip: str) -> str:
    """The /etc/hosts the kubelet writes for a pod: localhost, and the pod's hostname at its IP."""
    spec = pod["spec"]
    name = spec.get("hostname") or pod["metadata"]["name"]
    fqdn = f"{name}.{spec['subdomain']}.{pod['metadata']['namespace']}.svc.cluster.local\t" if spec.get("subdomain") else ""
    lines = ["# Kubernetes-managed hosts file (localcluster node agent).", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback", f"{ip}\t{fqdn}{name}"]
    for alias in spec.get("hostAliases") or []:
        lines.append(f"{alias['ip']}\t" + "\t".join(alias.get("hostnames") or []))
    return "\n".join(lines) + "\n"


def terminated_state(returncode: int, started: float, finished: float, message: str = "",
                     start_error: str = "", container_id: str = "") -> dict:
    """A `terminated` container state from a process result (a negative returncode is a signal)."""
    if start_error:
        code, reason, message = 128, "StartError", start_error
    elif returncode < 0:
        code, reason = 128 - returncode, "Error"
    else:
        code, reason = returncode, "Completed" if returncode == 0 else "Error"
    state = {"exitCode": code, "reason": reason, "startedAt": now_iso(started), "finishedAt": now_iso(finished),
             "containerID": container_id}
    if returncode < 0:
        state["signal"] = -returncode
    if message:
        state["message"] = message
    return state


def termination_message(file_content: bytes, log_tail: bytes, policy: str | None, exit_code: int) -> str:
    """The message the kubelet reports: the file's content (4 KiB at most), or with FallbackToLogsOnError
    and a failure and an empty file, the last 80 lines / 2048 bytes of the log."""
    msg = file_content[:TERMINATION_MESSAGE_LIMIT]
    if not msg.strip() and policy == "FallbackToLogsOnError" and exit_code != 0:
        lines = log_tail.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        msg = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return msg.decode(errors="replace")


def pod_phase(restart_policy: str, init_ok: bool, init_failed: bool, states: list[dict]) -> str:
    """The kubelet's phase rule from the containers' current states."""
    if init_failed and restart_policy == "Never":
        return "Failed"
    if not init_ok:
        return "Pending"
    kinds = [next(iter(s), "waiting") for s in states]
    if any(k == "running" for k in kinds):
        return "Running"
    if all(k == "terminated" for k in kinds):
        codes = [s["terminated"]["exitCode"] for s in states]
        if restart_policy == "Always":
            return "Running"
        if all(c == 0 for c in codes):
            return "Succeeded"
        return "Failed" if restart_policy == "Never" else "Running"
    if any(k == "terminated" for k in kinds) or any(s.get("waiting", {}).get("reason") == "CrashLoopBackOff"
                                                    for s in states):
        return "Running"  # some ran already and wait to restart
    return "Pending"


def conditions(old: list[dict], wanted: dict[str, tuple[bool, str | None]], now: str) -> list[dict]:
    """Pod conditions; `lastTransitionTime` moves only when a condition's status flips."""
    previous = {c["type"]: c for c in old or []}
    out = []
    for ctype, (ok, reason) in wanted.items():
        status = "True" if ok else "False"
        before = previous.get(ctype)
        cond = {"type": ctype, "status": status,
                "lastTransitionTime": before["lastTransitionTime"] if before and before["status"] == status
                and before.get("lastTransitionTime") else now, "lastProbeTime": None}
        if reason:
            cond["reason"] = reason
        out.append(cond)
    return out


def pod_status(pod: dict, run: dict, now: str) -> dict:
    """The status the node reports. `run` is a snapshot of what the agent knows:
    {podIP, hostIP, startTime, init: [container status], containers: [container status],
     initOk, initFailed, reason, message, phase (a forced phase, e.g. Failed on a deadline)}."""
    policy = pod["spec"].get("restartPolicy", "Always")
    states = [c["state"] for c in run["containers"]]
    phase = run.get("phase") or pod_phase(policy, run["initOk"], run["initFailed"], states)
    all_ready = bool(run["containers"]) and all(c["ready"] for c in run["containers"])
    not_ready = [c["name"] for c in run["containers"] if not c["ready"]]
    ready_reason = None if all_ready else ("PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady")
    init_reason = None if run["initOk"] else "ContainersNotInitialized"
    if phase in ("Succeeded", "Failed") and run["initOk"]:
        init_reason = "PodCompleted" if not pod["spec"].get("initContainers") else None
    wanted = {
        "PodReadyToStartContainers": (bool(run.get("sandboxReady", True)), None),
        "Initialized": (run["initOk"], None if run["initOk"] else init_reason),
        "Ready": (all_ready and phase == "Running", ready_reason),
        "ContainersReady": (all_ready and phase == "Running", ready_reason),
    }
    existing = [c for c in pod.get("status", {}).get("conditions") or [] if c["type"] != "PodScheduled"]
    status = {
        "phase": phase,
        "conditions": conditions(existing, wanted, now),
        "hostIP": run["hostIP"], "hostIPs": [{"ip": run["hostIP"]}],
        "podIP": run["podIP"], "podIPs": [{"ip": run["podIP"]}] if run["podIP"] else [],
        "startTime": run["startTime"],
        "containerStatuses": run["containers"],
        "reason": run.get("reason"), "message": run.get("message"),
    }
    if not all_ready and not_ready and phase not in ("Succeeded", "Failed"):
        for c in status["conditions"]:
            if c["type"] in ("Ready", "ContainersReady"):
                c["message"] = f"containers with unready status: [{' '.join(not_ready)}]"
    if pod["spec"].get("initContainers"):
        status["initContainerStatuses"] = run["init"]
    return status


def take_events(events: queue.Queue, seconds: float, handle, clock=time.monotonic) -> int:
    """Hand each event that arrives within `seconds` to `handle`, then return how many there were: at the
    deadline even when more keep coming, so a busy watch never keeps the sync loop from stepping its pods."""
    deadline = clock() + seconds
    taken = 0
    while (left := deadline - clock()) > 0:
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            break
        handle(event)
        taken += 1
    return taken


def restart_wanted(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def backoff_seconds(restarts: int, base: float = 1.0, cap: float = 60.0) -> float:
    return min(base * 2 ** restarts, cap)


# =============================================================================================== API I/O

class KubeError(Exception):
    def __init__(self, status: int, body: str):
        self.status, self.body = status, body
        super().__init__(f"{status}: {body[:500]}")


class Kube:
    """A few JSON calls to the API server, with the credentials of a kubeconfig (loaded by the client)."""

    def __init__(self, kubeconfig: str):
        import kubernetes
        import urllib3
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.base = cfg.host.rstrip("/")
        self.headers = {"Accept": "application/json"}
        if cfg.api_key.get("authorization"):
            self.headers["Authorization"] = cfg.api_key["authorization"]
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=16, cert_reqs="CERT_REQUIRED",
                                        ca_certs=cfg.ssl_ca_cert, cert_file=cfg.cert_file, key_file=cfg.key_file)
        self.urllib3 = urllib3

    def url(self, path: str, query: dict | None = None) -> str:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        return self.base + path + ("?" + urllib.parse.urlencode(q) if q else "")

    def call(self, method: str, path: str, body=None, query: dict | None = None,
             content_type: str = "application/json", timeout: float = 15.0) -> dict:
        headers = dict(self.headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        r = self.pool.request(method, self.url(path, query), body=data, headers=headers,
                              timeout=self.urllib3.Timeout(connect=5, read=timeout), retries=False)
        text = r.data.decode(errors="replace")
        if r.status >= 300:
            raise KubeError(r.status, text)
        return json.loads(text) if text else {}

    def get(self, path: str, **query) -> dict | None:
        try:
            return self.call("GET", path, query=query)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def patch(self, path: str, body: dict, merge: str = "strategic-merge-patch") -> dict:
        return self.call("PATCH", path, body, content_type=f"application/{merge}+json")

    def watch(self, path: str, query: dict):
        """Yield watch events; returns when the server closes the stream. A 410 raises KubeError(410)."""
        q = {**query, "watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": "240"}
        r = self.pool.request("GET", self.url(path, q), headers=self.headers, preload_content=False,
                              timeout=self.urllib3.Timeout(connect=5, read=300), retries=False)
        try:
            if r.status >= 300:
                raise KubeError(r.status, r.read().decode(errors="replace"))
            buf = b""
            for chunk in r.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    if ev["type"] == "ERROR":
                        raise KubeError(ev["object"].get("code", 500), json.dumps(ev["object"]))
                    yield ev
        finally:
            r.release_conn()


# =============================================================================================== runtime

@dataclass
class ContainerRun:
    spec: dict
    init: bool = False
    restarts: int = 0
    proc: subprocess.Popen | None = None
    started: float = 0.0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    next_try: float = 0.0
    pull_failures: int = 0
    exit_code: int | None = None  # of the last run, for the restart decision
    done: bool = False  # init container finished with 0

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self, uid: str) -> dict:
        running = "running" in self.state
        cid = f"localcluster://{uid[:8]}-{self.name}-{self.restarts}" if self.started else None
        out = {"name": self.name, "image": self.spec["image"], "imageID": "", "ready": (running and not self.init) or self.done,
               "started": running, "restartCount": self.restarts, "state": self.state,
               "lastState": self.last_state}
        if cid:
            out["containerID"] = cid
        return out


@dataclass
class PodRun:
    pod: dict
    dir: Path
    ip: str = ""
    start_time: str = ""
    containers: list[ContainerRun] = field(default_factory=list)
    init: list[ContainerRun] = field(default_factory=list)
    prepared: bool = False
    volume_dirs: dict = field(default_factory=dict)
    prepare_error: str = ""
    next_prepare: float = 0.0
    forced_phase: str = ""
    reason: str | None = None
    message: str | None = None
    kill_sent_at: float = 0.0
    kill_deadline: float = 0.0
    deleted_in_api: bool = False
    published: str = ""
    delete_requested: bool = False
    passive: bool = False  # finished before this agent saw it: only its deletion is ours to finish

    @property
    def uid(self) -> str:
        return self.pod["metadata"]["uid"]

    @property
    def key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    def procs(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.init + self.containers if c.proc is not None and c.proc.poll() is None]


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.kube = Kube(args.kubeconfig)
        self.node = args.node_name
        self.state = Path(args.state_dir)
        (self.state / "pods").mkdir(parents=True, exist_ok=True)
        (self.state / "volumes").mkdir(parents=True, exist_ok=True)
        self.events: queue.Queue = queue.Queue()
        self.runs: dict[str, PodRun] = {}  # uid -> run; owned by the sync thread
        self.ips_in_use: set[str] = set()
        self.next_ip = 2
        self.stopping = threading.Event()
        self.rules: list[ImageRule] = []
        self.rules_mtime = -1.0
        self.isolate = self.namespaces_work()
        self.allocatable = {"cpu": args.cpu, "memory": args.memory, "nvidia.com/gpu": str(args.gpus)}

    # -- helpers

    def log(self, msg: str) -> None:
        print(f"{now_iso()} {msg}", flush=True)

    def namespaces_work(self) -> bool:
        probe = subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "true"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            self.log("WARNING: cannot create mount namespaces (need root and unshare); pods run without their "
                     f"volumes at mountPath, only at $LOCALCLUSTER_VOLUME_<NAME>: {probe.stderr.strip()}")
        return probe.returncode == 0

    def image_rules(self) -> list[ImageRule]:
        path = Path(self.args.images)
        with contextlib.suppress(OSError):
            mtime = path.stat().st_mtime
            if mtime != self.rules_mtime:
                import yaml
                self.rules = parse_image_rules(yaml.safe_load(path.read_text()) or {})
                self.rules_mtime = mtime
                self.log(f"image rules loaded: {[r.pattern for r in self.rules]}")
        return self.rules

    def lookup(self, kind: str, ns: str, name: str) -> dict | None:
        plural = {"Secret": "secrets", "ConfigMap": "configmaps"}[kind]
        return self.kube.get(f"/api/v1/namespaces/{ns}/{plural}/{name}")

    def event(self, pod: dict, etype: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        body = {"metadata": {"generateName": meta["name"] + ".", "namespace": meta["namespace"]},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": meta["namespace"],
                                   "name": meta["name"], "uid": meta["uid"]},
                "reason": reason, "message": message, "type": etype, "count": 1,
                "firstTimestamp": now_iso(), "lastTimestamp": now_iso(), "eventTime": None,
                "source": {"component": "kubelet", "host": self.node}, "reportingComponent": "kubelet",
                "reportingInstance": self.node}
        with contextlib.suppress(Exception):
            self.kube.call("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body)

    # -- node registration

    def node_status(self) -> dict:
        cap = {**self.allocatable, "pods": "110", "ephemeral-storage": "100Gi"}
        t = now_iso()
        conds = [("Ready", "True", "KubeletReady", "node agent is posting ready status"),
                 ("MemoryPressure", "False", "KubeletHasSufficientMemory", "node has sufficient memory available"),
                 ("DiskPressure", "False", "KubeletHasNoDiskPressure", "node has no disk pressure"),
                 ("PIDPressure", "False", "KubeletHasSufficientPID", "node has sufficient PID available")]
        return {"capacity": cap, "allocatable": cap,
                "conditions": [{"type": c, "status": s, "reason": r, "message": m, "lastHeartbeatTime": t,
                                "lastTransitionTime": self.started_iso} for c, s, r, m in conds],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                              {"type": "Hostname", "address": self.node}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.args.kubelet_port}},
                "nodeInfo": {"machineID": "localcluster", "systemUUID": "localcluster", "bootID": self.started_iso,
                             "kernelVersion": platform.release(), "osImage": "localcluster node agent",
                             "containerRuntimeVersion": "localcluster://1", "kubeletVersion": "v1.37.2",
                             "kubeProxyVersion": "", "operatingSystem": "linux",
                             "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                                                       platform.machine())}}

    def register(self) -> None:
        self.started_iso = now_iso()
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": self.node_status()["nodeInfo"]["architecture"],
                  "node-role.kubernetes.io/localcluster": ""}
        if self.args.gpus:
            labels["nvidia.com/gpu.present"] = "true"
        for kv in self.args.label or []:
            k, _, v = kv.partition("=")
            labels[k] = v
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node, "labels": labels}}
        try:
            self.kube.call("POST", "/api/v1/nodes", body)
        except KubeError as e:
            if e.status != 409:
                raise
            self.kube.patch(f"/api/v1/nodes/{self.node}", {"metadata": {"labels": labels}})
        self.kube.patch(f"/api/v1/nodes/{self.node}/status", {"status": self.node_status()})
        self.ensure_storage_class()

    def heartbeat_loop(self) -> None:
        from localcluster import alive  # a sibling module: this file runs as a script from its folder
        n = 0
        while not self.stopping.wait(5 if n == 0 else 10):
            n += 1
            if self.args.owner_pid and not alive(self.args.owner_pid):
                self.log(f"owner process {self.args.owner_pid} ended; taking the cluster down")
                subprocess.Popen([sys.executable, str(HERE / "localcluster.py"), "down", "--dir", self.args.cluster_dir],
                                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
                return
            try:
                self.renew_lease()
                if n % 3 == 0:
                    self.kube.patch(f"/api/v1/nodes/{self.node}/status", {"status": self.node_status()})
            except Exception as e:  # keep beating; the API server may be restarting
                self.log(f"heartbeat failed: {e}")

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": micro_iso()}
        try:
            self.kube.patch(path, {"spec": spec}, merge="merge-patch")
        except KubeError as e:
            if e.status != 404:
                raise
            node = self.kube.get(f"/api/v1/nodes/{self.node}")
            owner = [{"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node["metadata"]["uid"]}]
            self.kube.call("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "metadata": {"name": self.node, "namespace": "kube-node-lease", "ownerReferences": owner},
                "spec": spec})

    # -- storage

    def ensure_storage_class(self) -> None:
        body = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": self.args.storage_class,
                             "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
                "allowVolumeExpansion": True}
        with contextlib.suppress(KubeError):
            self.kube.call("POST", "/apis/storage.k8s.io/v1/storageclasses", body)

    def provision_once(self) -> None:
        classes = self.kube.call("GET", "/apis/storage.k8s.io/v1/storageclasses")["items"]
        ours = {c["metadata"]["name"] for c in classes if c.get("provisioner") == PROVISIONER}
        for pvc in self.kube.call("GET", "/api/v1/persistentvolumeclaims")["items"]:
            spec, meta = pvc["spec"], pvc["metadata"]
            if spec.get("volumeName") or spec.get("storageClassName") not in ours or meta.get("deletionTimestamp"):
                continue
            name = f"pvc-{meta['uid']}"
            folder = self.state / "volumes" / name
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)
            pv = {"apiVersion": "v1", "kind": "PersistentVolume",
                  "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
                               "labels": {"localcluster.io/node": self.node}},
                  "spec": {"capacity": {"storage": spec["resources"]["requests"]["storage"]},
                           "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                           "persistentVolumeReclaimPolicy": "Delete",
                           "storageClassName": spec["storageClassName"],
                           "volumeMode": spec.get("volumeMode", "Filesystem"),
                           "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                           "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                        "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}}}
            try:
                self.kube.call("POST", "/api/v1/persistentvolumes", pv)
                self.log(f"provisioned {name} for {meta['namespace']}/{meta['name']} at {folder}")
            except KubeError as e:
                if e.status != 409:
                    raise
        for pv in self.kube.call("GET", "/api/v1/persistentvolumes")["items"]:
            ann = pv["metadata"].get("annotations") or {}
            if ann.get("pv.kubernetes.io/provisioned-by") == PROVISIONER and \
                    pv.get("status", {}).get("phase") in ("Released", "Failed") and \
                    pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                shutil.rmtree(pv["spec"]["hostPath"]["path"], ignore_errors=True)
                with contextlib.suppress(KubeError):
                    self.kube.call("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
                self.log(f"deleted released volume {pv['metadata']['name']}")

    def provisioner_loop(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self.provision_once()
            except Exception as e:
                self.log(f"provisioner: {e}")

    # -- watching pods

    def watch_loop(self) -> None:
        path = "/api/v1/pods"
        query = {"fieldSelector": f"spec.nodeName={self.node}"}
        while not self.stopping.is_set():
            try:
                listing = self.kube.call("GET", path, query=query)
                rv = listing["metadata"]["resourceVersion"]
                self.events.put(("LIST", (listing["items"], int(rv))))
                while not self.stopping.is_set():
                    for ev in self.kube.watch(path, {**query, "resourceVersion": rv}):
                        rv = ev["object"]["metadata"].get("resourceVersion", rv)
                        if ev["type"] != "BOOKMARK":
                            self.events.put((ev["type"], ev["object"]))
            except KubeError as e:
                if e.status != 410:
                    self.log(f"pod watch: {e}")
                    self.stopping.wait(1)
                # 410 Gone: our resourceVersion is too old; list again
            except Exception as e:
                self.log(f"pod watch: {type(e).__name__}: {e}")
                self.stopping.wait(1)

    def resync_loop(self) -> None:
        """A full list now and then, in case a watch stalls without an error."""
        while not self.stopping.wait(30):
            try:
                listing = self.kube.call("GET", "/api/v1/pods", query={"fieldSelector": f"spec.nodeName={self.node}"})
                self.events.put(("LIST", (listing["items"], int(listing["metadata"]["resourceVersion"]))))
            except Exception as e:  # noqa: BLE001 - the next resync or the watch catches up
                self.log(f"pod resync: {type(e).__name__}: {e}")

    # -- the sync loop (one thread owns all PodRuns)

    def sync_loop(self) -> None:
        while not self.stopping.is_set():
            take_events(self.events, 0.5, lambda event: self.observe(*event))
            for run in list(self.runs.values()):
                try:
                    self.step(run)
                except Exception as e:
                    self.log(f"{run.key}: sync failed: {type(e).__name__}: {e}")

    def observe(self, kind: str, obj) -> None:
        if kind == "LIST":
            items, list_rv = obj
            seen = {p["metadata"]["uid"] for p in items}
            for uid, run in self.runs.items():
                # a pod missing from the list is gone, unless the watch told us of it after the list was taken
                if uid not in seen and resource_version(run.pod) <= list_rv:
                    run.deleted_in_api = True
            for pod in items:
                self.observe("MODIFIED", pod)
            return
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            if uid in self.runs:
                self.runs[uid].deleted_in_api = True
                self.runs[uid].pod = obj
            return
        if uid in self.runs:
            if resource_version(obj) >= resource_version(self.runs[uid].pod):
                self.runs[uid].pod = obj
            return
        run = PodRun(pod=obj, dir=self.state / "pods" / f"{obj['metadata']['namespace']}_{obj['metadata']['name']}_{uid}")
        if obj.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            run.passive = True
        elif obj.get("status", {}).get("containerStatuses") and any(
                "waiting" not in cs.get("state", {}) for cs in obj["status"]["containerStatuses"]):
            # its processes belonged to an earlier agent; like a lost node, the pod fails
            self.kill_recorded_groups(run.dir)
            run.forced_phase, run.reason = "Failed", "NodeAgentRestarted"
            run.message = "the node agent restarted while this pod ran"
        self.runs[uid] = run

    def kill_recorded_groups(self, d: Path) -> None:
        with contextlib.suppress(OSError, ValueError):
            for pgid in (d / "pgids").read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pgid), signal.SIGKILL)

    def step(self, run: PodRun) -> None:
        pod = run.pod
        if run.deleted_in_api:
            self.signal_all(run, signal.SIGKILL)
            self.reap(run)
            if not run.procs():
                self.forget(run)
            return
        if pod["metadata"].get("deletionTimestamp"):
            self.terminate(run)
            return
        if run.passive:
            return
        if run.forced_phase:  # failing (deadline, init failure): report once the processes are gone
            if run.procs() and time.monotonic() >= run.kill_deadline:
                self.signal_all(run, signal.SIGKILL)
            self.reap(run)
            if not run.procs():
                self.publish(run)
            return
        if not run.prepared:
            if time.monotonic() < run.next_prepare:
                return
            self.prepare(run)
            if not run.prepared:
                self.publish(run)
                return
        self.reap(run)
        if self.deadline_exceeded(run):
            return
        if self.run_init_containers(run):
            for c in run.containers:
                self.maybe_start(run, c)
        self.publish(run)

    def deadline_exceeded(self, run: PodRun) -> bool:
        ads = run.pod["spec"].get("activeDeadlineSeconds")
        if ads is None or not run.start_time or time.time() < parse_iso(run.start_time) + ads:
            return False
        run.forced_phase, run.reason = "Failed", "DeadlineExceeded"
        run.message = "Pod was active on the node longer than the specified deadline"
        self.event(run.pod, "Normal", "DeadlineExceeded", run.message)
        run.kill_deadline = time.monotonic() + run.pod["spec"].get("terminationGracePeriodSeconds", 30)
        self.signal_all(run, signal.SIGTERM)
        return True

    # -- preparing a pod: IP, folders, volumes

    def allocate_ip(self, pod: dict) -> str:
        if pod["spec"].get("hostNetwork"):
            return "127.0.0.1"
        while True:
            n, self.next_ip = self.next_ip, self.next_ip + 1 if self.next_ip < 65000 else 2
            ip = f"{self.args.pod_ip_prefix}.{n // 254}.{n % 254 + 1}"
            if ip not in self.ips_in_use:
                self.ips_in_use.add(ip)
                return ip

    def token_for(self, pod: dict):
        def request(audience: str | None, expiration: int) -> str:
            meta = pod["metadata"]
            sa = pod["spec"].get("serviceAccountName") or "default"
            spec = {"expirationSeconds": expiration,
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}}
            if audience:
                spec["audiences"] = [audience]
            try:
                r = self.kube.call("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token",
                                   {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
            except KubeError as e:
                raise ConfigError(f"cannot get a token for service account {sa}: {e}") from e
            return r["status"]["token"]
        return request

    def prepare(self, run: PodRun) -> None:
        pod = run.pod
        if not run.ip:
            run.ip = self.allocate_ip(pod)
            run.start_time = now_iso()
            run.dir.mkdir(parents=True, exist_ok=True)
            run.init = [ContainerRun(c, init=True) for c in pod["spec"].get("initContainers") or []]
            run.containers = [ContainerRun(c) for c in pod["spec"]["containers"]]
        try:
            dirs = {}
            for vol in pod["spec"].get("volumes") or []:
                dirs[vol["name"]] = self.materialize(pod, vol, run.dir / "volumes" / vol["name"])
        except (ConfigError, KubeError) as e:
            msg = f"MountVolume.SetUp failed: {e}"
            if msg != run.prepare_error:
                self.event(pod, "Warning", "FailedMount", msg)
            run.prepare_error, run.next_prepare = msg, time.monotonic() + 2
            for c in run.init + run.containers:
                c.state = {"waiting": {"reason": "ContainerCreating", "message": msg}}
            return
        run.volume_dirs, run.prepared, run.prepare_error = dirs, True, ""

    def materialize(self, pod: dict, vol: dict, folder: Path) -> tuple[str, bool]:
        """A volume's host folder (filled for configMap/secret/projected/downwardAPI) and whether it is read-only."""
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]
            ns = pod["metadata"]["namespace"]
            pvc = self.kube.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim['claimName']}")
            if pvc is None:
                raise ConfigError(f'persistentvolumeclaim "{claim["claimName"]}" not found')
            if pvc.get("status", {}).get("phase") != "Bound":
                raise ConfigError(f'persistentvolumeclaim "{claim["claimName"]}" is not bound yet')
            pv = self.kube.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
            src = (pv or {}).get("spec", {})
            path = (src.get("hostPath") or src.get("local") or {}).get("path")
            if not path:
                raise ConfigError(f"volume {pvc['spec']['volumeName']} is neither hostPath nor local")
            Path(path).mkdir(parents=True, exist_ok=True)
            return path, bool(claim.get("readOnly"))
        if "hostPath" in vol:
            path = vol["hostPath"]["path"]
            if vol["hostPath"].get("type") in ("DirectoryOrCreate",):
                Path(path).mkdir(parents=True, exist_ok=True)
            return path, False
        if "emptyDir" in vol:
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)
            return str(folder), False
        files = volume_files(pod, vol, self.lookup, self.token_for(pod), self.allocatable)
        if files is None:
            raise ConfigError(f"volume {vol['name']!r}: unsupported kind {sorted(k for k in vol if k != 'name')}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for rel, (content, mode) in files.items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(mode)
        return str(folder), True

    # -- containers

    def run_init_containers(self, run: PodRun) -> bool:
        """Run init containers one after another; True once all have succeeded."""
        policy = run.pod["spec"].get("restartPolicy", "Always")
        for c in run.init:
            if c.done:
                continue
            if c.proc is None:
                if c.exit_code is not None and not restart_wanted("OnFailure" if policy != "Never" else "Never",
                                                                  c.exit_code):
                    run.forced_phase, run.reason = "Failed", None
                    return False
                self.maybe_start(run, c)
            return False
        return True

    def maybe_start(self, run: PodRun, c: ContainerRun) -> None:
        if c.proc is not None or time.monotonic() < c.next_try:
            return
        policy = run.pod["spec"].get("restartPolicy", "Always")
        if c.init and policy == "Always":
            policy = "OnFailure"
        if c.exit_code is not None and not restart_wanted(policy, c.exit_code):
            return
        rule = match_image(c.spec["image"], self.image_rules())
        if rule is None:
            self.pull_failed(run, c)
            return
        c.pull_failures = 0
        try:
            env = container_env(run.pod | {"status": {**run.pod.get("status", {}), "podIP": run.ip,
                                                      "podIPs": [{"ip": run.ip}], "hostIP": "127.0.0.1"}},
                                c.spec, rule, self.lookup, self.args.api_port, self.allocatable)
            argv = container_argv(c.spec, rule, env)
            cdir = run.dir / "containers" / c.name
            cdir.mkdir(parents=True, exist_ok=True)
            term = cdir / "termination-log"
            term.write_bytes(b"")
            mounts = container_mounts(c.spec, run.volume_dirs, str(term))
            if not run.pod["spec"].get("hostNetwork"):
                hosts = run.dir / "etc-hosts"
                hosts.write_text(hosts_file(run.pod, run.ip))
                mounts.append(Mount(str(hosts), "/etc/hosts", True))
        except (ConfigError, KubeError) as e:
            msg = str(e)
            if c.state.get("waiting", {}).get("message") != msg:
                self.event(run.pod, "Warning", "Failed", f"Error: {msg}")
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": msg}}
            c.next_try = time.monotonic() + 2
            return
        if c.exit_code is not None:  # a restart in place
            c.restarts += 1
        self.launch(run, c, rule, env, argv, mounts, cdir)

    def pull_failed(self, run: PodRun, c: ContainerRun) -> None:
        image = c.spec["image"]
        c.pull_failures += 1
        if c.pull_failures == 1 or c.state.get("waiting", {}).get("reason") == "ImagePullBackOff":
            msg = (f'Failed to pull image "{image}": this node runs only images listed in '
                   f'{self.args.images} (add a rule for it)')
            c.state = {"waiting": {"reason": "ErrImagePull", "message": msg}}
            self.event(run.pod, "Warning", "Failed", msg)
            self.event(run.pod, "Warning", "Failed", "Error: ErrImagePull")
            c.next_try = time.monotonic() + 5  # shown as ErrImagePull for a while, then back-off
        else:
            delay = backoff_seconds(c.pull_failures, base=5, cap=60)
            c.state = {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}
            self.event(run.pod, "Normal", "BackOff", f'Back-off pulling image "{image}"')
            self.event(run.pod, "Warning", "Failed", "Error: ImagePullBackOff")
            c.next_try = time.monotonic() + delay

    def launch(self, run: PodRun, c: ContainerRun, rule: ImageRule, env: dict, argv: list[str],
               mounts: list[Mount], cdir: Path) -> None:
        spec = run.pod["spec"]
        log_path = cdir / f"{c.restarts}.log"
        root = cdir / "root"
        root.mkdir(exist_ok=True)
        start_error = cdir / "start-error"
        start_error.unlink(missing_ok=True)
        env = dict(env)
        if not self.isolate:
            for m in mounts:
                env[f"LOCALCLUSTER_VOLUME_{re.sub('[^A-Za-z0-9]', '_', m.target).strip('_').upper()}"] = m.source
        launch_spec = {"root": str(root), "argv": argv, "env": env, "isolate": self.isolate,
                       "cwd": c.spec.get("workingDir") or rule.workingDir or "/",
                       "hostname": spec.get("hostname") or run.pod["metadata"]["name"],
                       "mounts": [m.__dict__ for m in mounts], "imagePaths": list(rule.contents),
                       "startErrorFile": str(start_error)}
        spec_file = cdir / f"launch-{c.restarts}.json"
        spec_file.write_text(json.dumps(launch_spec))
        spec_file.chmod(0o600)
        cmd = [sys.executable, "-I", "-S", str(HERE / "podlaunch.py"), str(spec_file)]
        if self.isolate:
            cmd = ["unshare", "--mount", "--uts", "--propagation", "private", *cmd]
        with open(log_path, "ab") as log:
            c.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        c.started = time.time()
        c.state = {"running": {"startedAt": now_iso(c.started)}}
        self.record_groups(run)
        self.log(f"{run.key}: started {c.name} (pid {c.proc.pid}, ip {run.ip}): {argv}")
        self.event(run.pod, "Normal", "Started", f"Started container {c.name}")

    def record_groups(self, run: PodRun) -> None:
        """Note the process groups of the pod's running containers, for an agent that restarts to kill. A pod
        deleted before it was prepared has no folder and no processes: nothing to note (writing there raised,
        every step, and its deletion was never finished)."""
        if run.dir.is_dir():
            (run.dir / "pgids").write_text(" ".join(str(p.pid) for p in run.procs()))

    def reap(self, run: PodRun) -> None:
        """Turn exited processes into terminated states and schedule restarts."""
        policy = run.pod["spec"].get("restartPolicy", "Always")
        for c in run.init + run.containers:
            if c.proc is None or c.proc.poll() is None:
                continue
            rc, finished = c.proc.returncode, time.time()
            c.proc = None
            cdir = run.dir / "containers" / c.name
            start_error = (cdir / "start-error").read_text() if (cdir / "start-error").exists() else ""
            term = cdir / "termination-log"
            content = term.read_bytes() if term.exists() else b""
            log_tail = b""
            with contextlib.suppress(OSError), open(cdir / f"{c.restarts}.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                log_tail = f.read()
            message = termination_message(content, log_tail, c.spec.get("terminationMessagePolicy"),
                                          rc if rc >= 0 else 128 - rc)
            c.state = {"terminated": terminated_state(rc, c.started, finished, message, start_error,
                                                      f"localcluster://{run.uid[:8]}-{c.name}-{c.restarts}")}
            (cdir / f"{c.restarts}.exited").write_text(str(rc))
            self.log(f"{run.key}: {c.name} exited with {rc}")
            c.exit_code = code = c.state["terminated"]["exitCode"]
            if c.init and code == 0:
                c.done = True
            elif restart_wanted("OnFailure" if c.init and policy == "Always" else policy, code) and \
                    not run.pod["metadata"].get("deletionTimestamp") and not run.forced_phase:
                delay = backoff_seconds(c.restarts)
                c.next_try = time.monotonic() + delay
                c.last_state = {"terminated": c.state["terminated"]}
                c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                       "message": f"back-off {delay:.0f}s restarting failed container={c.name} "
                                                  f"pod={run.pod['metadata']['name']}"}}
        self.record_groups(run)

    def signal_all(self, run: PodRun, sig: int) -> None:
        for p in run.procs():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)

    def terminate(self, run: PodRun) -> None:
        """Graceful deletion: SIGTERM, the grace period, SIGKILL; then the pod object is removed."""
        if not run.kill_sent_at:
            grace = run.pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = run.pod["spec"].get("terminationGracePeriodSeconds", 30)
            run.kill_sent_at, run.kill_deadline = time.monotonic(), time.monotonic() + grace
            if run.procs():
                for c in run.containers + run.init:
                    if c.proc is not None:
                        self.event(run.pod, "Normal", "Killing", f"Stopping container {c.name}")
                self.signal_all(run, signal.SIGTERM)
        if run.procs() and time.monotonic() >= run.kill_deadline:
            self.signal_all(run, signal.SIGKILL)
        self.reap(run)
        if run.procs():
            return
        if not run.delete_requested:
            if not run.passive:
                with contextlib.suppress(KubeError):
                    self.publish(run)
            meta = run.pod["metadata"]
            try:
                self.kube.call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                               {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                                "preconditions": {"uid": meta["uid"]}})
            except KubeError as e:
                if e.status not in (404, 409):
                    raise
            run.delete_requested = True

    def forget(self, run: PodRun) -> None:
        self.runs.pop(run.uid, None)
        self.ips_in_use.discard(run.ip)
        shutil.rmtree(run.dir, ignore_errors=True)
        self.log(f"{run.key}: removed")

    def publish(self, run: PodRun) -> None:
        snapshot = {"podIP": run.ip, "hostIP": "127.0.0.1", "startTime": run.start_time or now_iso(),
                    "init": [c.status(run.uid) for c in run.init],
                    "containers": [c.status(run.uid) for c in run.containers]
                    or [ContainerRun(c).status(run.uid) for c in run.pod["spec"]["containers"]],
                    "initOk": all(c.done for c in run.init), "initFailed": run.forced_phase == "Failed" and
                    any("terminated" in c.state and not c.done for c in run.init),
                    "phase": run.forced_phase or None, "reason": run.reason, "message": run.message,
                    "sandboxReady": run.prepared}
        status = pod_status(run.pod, snapshot, now_iso())
        # only what we decide, without timestamps that would change every time, decides a new patch
        key = json.dumps(status, sort_keys=True)
        if key == run.published:
            return
        meta = run.pod["metadata"]
        try:
            updated = self.kube.patch(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                                      {"metadata": {"uid": meta["uid"]}, "status": status})
            run.pod = updated
            run.published = key
        except KubeError as e:
            if e.status == 404:
                run.deleted_in_api = True
            elif e.status != 409:
                raise

    # -- shutdown

    def shutdown(self, *_) -> None:
        self.stopping.set()

    def stop_all_pods(self) -> None:
        for run in self.runs.values():
            self.signal_all(run, signal.SIGTERM)
        end = time.monotonic() + 5
        while any(r.procs() for r in self.runs.values()) and time.monotonic() < end:
            time.sleep(0.1)
        for run in self.runs.values():
            self.signal_all(run, signal.SIGKILL)


# =============================================================================================== logs server

def container_log_files(state: Path, ns: str, pod: str, container: str) -> list[Path]:
    """Log files of a container, oldest restart first."""
    pods = sorted((state / "pods").glob(f"{ns}_{pod}_*"), key=lambda p: p.stat().st_mtime)
    if not pods:
        return []
    logs = (pods[-1] / "containers" / container).glob("*.log")
    return sorted(logs, key=lambda p: int(p.stem))


def tail_bytes(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    if tail_lines is not None:
        data = b"".join(data.splitlines(keepends=True)[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


def make_log_handler(state: Path):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):  # quiet
            pass

        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            q = dict(urllib.parse.parse_qsl(url.query))
            parts = url.path.strip("/").split("/")
            if url.path in ("/healthz", "/livez", "/readyz"):
                return self.reply(200, b"ok")
            if len(parts) != 4 or parts[0] != "containerLogs":
                return self.reply(404, b"not found")
            _, ns, pod, container = parts
            files = container_log_files(state, ns, pod, container)
            if q.get("previous") in ("true", "1"):
                files = files[:-1]
            if not files:
                return self.reply(404, f"no logs for container {container} of pod {ns}/{pod}".encode())
            path = files[-1]
            data = path.read_bytes()
            tail_lines = int(q["tailLines"]) if "tailLines" in q else None
            limit = int(q["limitBytes"]) if "limitBytes" in q else None
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            out = tail_bytes(data, tail_lines, limit)
            self.wfile.write(out)
            if q.get("follow") not in ("true", "1") or limit is not None:
                return
            offset = len(data)
            exited = path.with_suffix(".exited")
            while True:  # follow until the container ends (or the pod is gone)
                with contextlib.suppress(OSError), open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    if chunk:
                        offset += len(chunk)
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        continue
                if exited.exists() or not path.exists():
                    return
                time.sleep(0.2)

        def reply(self, code: int, body: bytes):
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve_logs(args, state: Path) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.kubelet_port), make_log_handler(state))
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    ctx.load_verify_locations(args.client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED  # only the API server (a client certificate of our CA) may read logs
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="logs").start()
    return server


# =============================================================================================== main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="localcluster node agent")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--node-name", default="localnode")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--images", required=True, help="YAML file of image rules (re-read on change)")
    ap.add_argument("--kubelet-port", type=int, required=True)
    ap.add_argument("--api-port", type=int, required=True, help="the API server's port, for in-cluster clients")
    ap.add_argument("--pod-ip-prefix", default="127.1", help="pods get addresses 127.N.x.y")
    ap.add_argument("--tls-cert", required=True)
    ap.add_argument("--tls-key", required=True)
    ap.add_argument("--client-ca", required=True)
    ap.add_argument("--cpu", default="8")
    ap.add_argument("--memory", default="32Gi")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--label", action="append", help="extra node label k=v (repeatable)")
    ap.add_argument("--storage-class", default="local-path")
    ap.add_argument("--owner-pid", type=int, default=None, help="when this process ends, run `localcluster.py down`")
    ap.add_argument("--cluster-dir", default=None)
    args = ap.parse_args(argv)

    agent = Agent(args)
    signal.signal(signal.SIGTERM, agent.shutdown)
    signal.signal(signal.SIGINT, agent.shutdown)
    serve_logs(args, agent.state)
    for attempt in range(60):
        try:
            agent.register()
            break
        except Exception as e:
            agent.log(f"registering node failed ({e}); retrying")
            time.sleep(1)
    else:
        return 1
    agent.renew_lease()
    agent.log(f"node {agent.node} registered: {agent.allocatable}, kubelet port {args.kubelet_port}, "
              f"mount namespaces {'on' if agent.isolate else 'OFF'}")
    for target in (agent.heartbeat_loop, agent.provisioner_loop, agent.watch_loop, agent.resync_loop):
        threading.Thread(target=target, daemon=True, name=target.__name__).start()
    try:
        agent.sync_loop()
    finally:
        agent.stop_all_pods()
    return 0


if __name__ == "__main__":
    sys.exit(main())
