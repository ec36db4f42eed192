#!/usr/bin/env python3
"""Kueue (sigs.k8s.io/kueue) on the local cluster: the real controller admitting queued Jobs.

    python hack/localcluster/kueue.py build                  # compile (or find cached) the manager
    python hack/localcluster/kueue.py start --dir DIR        # against the cluster `localcluster.py up --dir DIR` made
    python hack/localcluster/kueue.py stop  --dir DIR

`build(go)` runs `go install sigs.k8s.io/kueue/cmd/kueue@v0.17.0` (its go.mod has no replace directives), stamped
with the version as upstream's Makefile does, into `${QLORA_CACHE:-~/.cache/qlora-operator}/kueue/KEY/`, KEY
hashing the version, the Go version and the flags. Beside the binary it copies the manifests it needs from the
module's own `config/components` (CRDs, the manager's ClusterRoles, the webhook configurations); kustomize is not
here, so what its overlays do to them (names, the conversion patches, the webhook client config) is done below.

`start(...)` installs the CRDs and RBAC, starts the manager as a daemon (its own client certificate, user
`kueue-controller-manager`, bound to upstream's ClusterRole; internal certificate management off; webhooks served
on a loopback port with a certificate of the cluster CA, registered by URL), waits until it is ready and a request
has gone through its webhook, and returns (pid, ports). `stop()` removes the webhook registrations first, so the
cluster keeps creating Jobs without it. Failures raise `KueueError` with the component's log tail.

Kueue reads its metrics certificate from the fixed path /etc/kueue/metrics/certs when it does not make its own;
rather than write into the machine's /etc, the manager runs in a private mount namespace where a read-only
overlay adds that folder to /etc (so it needs root, as the cluster's node does).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

if __package__:
    from . import localcluster as lc
else:  # run as a script: this folder is on sys.path
    import localcluster as lc

MODULE, VERSION = "sigs.k8s.io/kueue", "v0.17.0"
USER = "kueue-controller-manager"
NAMESPACE = "kueue-system"
PREFIX = "kueue-"  # the namePrefix of upstream's config/default
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
INTEGRATIONS = {"batch/job": ("batch", "jobs")}  # framework name -> (group, resource) its webhooks admit
CRD_CONVERSION = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")  # crd/kustomization
ROLES = ("rbac/role.yaml", "rbac/metrics_auth_role.yaml", "rbac/manager_secrets_role.yaml")  # rbac/kustomization
MANIFESTS = ("crd/bases", *ROLES, "webhook/manifests.yaml")
WEBHOOK_CONFIGS = (f"{PREFIX}mutating-webhook-configuration", f"{PREFIX}validating-webhook-configuration")


class KueueError(Exception):
    """A failure with a message that says what failed; localcluster's callers print it as they do theirs."""


def say(msg: str) -> None:
    print(f"kueue: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- build

def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora-operator") / "kueue"


def ldflags(release_time: str) -> str:
    """Strip symbols and stamp the version as upstream's Makefile does (else it logs v0.0.0-main). A module
    download carries no git commit; the build date is the release's time, so the flags stay the same."""
    pkg = f"{MODULE}/pkg/version"
    return f"-s -w -X {pkg}.GitVersion={VERSION} -X {pkg}.GitCommit=none -X {pkg}.BuildDate={release_time}"


def build_key(go_version: str, flags: str) -> str:
    """The version, the Go version, the flags and which manifests the entry holds."""
    return hashlib.sha256("\0".join([f"{MODULE}@{VERSION}", go_version, flags, *MANIFESTS]).encode()).hexdigest()[:16]


def go_run(go: str, *args: str, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run([go, *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise KueueError(f"`go {' '.join(args)}` failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def build(go: str) -> Path:
    """The manager binary, compiled now or found in the cache; its manifests lie in `<binary's folder>/config`."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    module = json.loads(go_run(go, "mod", "download", "-json", f"{MODULE}@{VERSION}", cwd=root))
    release_time = json.loads(Path(module["Info"]).read_text())["Time"]
    go_version = lc.go_version(go)
    flags = ldflags(release_time)
    out = root / build_key(go_version, flags)
    if (out / ".complete").exists():
        return out / "kueue"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build waits for this one instead of repeating it
        if (out / ".complete").exists():
            return out / "kueue"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        say(f"building {MODULE}/cmd/kueue@{VERSION} with {go_version} (the first build takes minutes; cached in {out})")
        t0 = time.monotonic()
        go_run(go, "install", "-trimpath", f"-ldflags={flags}", f"{MODULE}/cmd/kueue@{VERSION}", cwd=root,
               env={"GOBIN": str(tmp)})
        seconds = round(time.monotonic() - t0, 1)
        for rel in MANIFESTS:  # read from the module, not kept in the repo
            src, dst = Path(module["Dir"]) / "config" / "components" / rel, tmp / "config" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        (tmp / ".complete").write_text(json.dumps({"go": go_version, "ldflags": flags, "seconds": seconds}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        say(f"built in {seconds}s")
        return out / "kueue"


# ---------------------------------------------------------------------------------------------- manifests

def config(ports: dict[str, int], cert_dir: Path) -> dict:
    """The manager's Configuration (config.kueue.x-k8s.io/v1beta2): only Jobs that name a queue, on loopback."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": NAMESPACE,
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(INTEGRATIONS)},
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": ports["webhook"], "certDir": str(cert_dir)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "leaderElection": {"leaderElect": False},  # one manager per cluster
        # the on-demand visibility API server wants certificates at /visibility and an APIService; not used here
        "featureGates": {"VisibilityOnDemand": False},
    }


def client_config(port: int, path: str, ca_bundle: str) -> dict:
    return {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}


def with_conversion_webhook(crd: dict, port: int, ca_bundle: str) -> dict:
    """What crd/patches/webhook_in_*.yaml do, with the webhook reached by URL instead of a Service."""
    if crd["spec"]["names"]["plural"] not in CRD_CONVERSION:
        return crd
    conversion = {"strategy": "Webhook", "webhook": {"clientConfig": client_config(port, "/convert", ca_bundle),
                                                     "conversionReviewVersions": ["v1"]}}
    return {**crd, "spec": {**crd["spec"], "conversion": conversion}}


def rbac(roles: list[dict]) -> list[dict]:
    """Upstream's ClusterRoles and Roles (named and placed as kustomize does), each bound to the manager's user."""
    objs = []
    for role in roles:
        meta = {**role["metadata"], "name": PREFIX + role["metadata"]["name"]}
        if role["kind"] == "Role":
            meta["namespace"] = NAMESPACE
        binding = {"name": meta["name"].removesuffix("-role") + "-rolebinding",
                   **({"namespace": NAMESPACE} if role["kind"] == "Role" else {})}
        objs.append({**role, "metadata": meta})
        objs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": role["kind"] + "Binding",
                     "metadata": binding,
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role["kind"], "name": meta["name"]},
                     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]})
    return objs


def served(hook: dict, integrations: dict = INTEGRATIONS) -> bool:
    """Kueue's own API and the enabled integrations. The others are no-op webhooks upstream registers too; left
    out, a pod or Deployment is never made to wait on (or fail with) this process."""
    wanted = {(g, r) for g, r in integrations.values()}
    return any(g == "kueue.x-k8s.io" or (g, r) in wanted
               for rule in hook["rules"] for g in rule["apiGroups"] for r in rule["resources"])


def webhook_configurations(manifests: list[dict], port: int, ca_bundle: str) -> list[dict]:
    """upstream's webhook/manifests.yaml: named as kustomize names them, the served webhooks only, by URL."""
    out = []
    for obj in manifests:
        hooks = [{**h, "clientConfig": client_config(port, h["clientConfig"]["service"]["path"], ca_bundle)}
                 for h in obj["webhooks"] if served(h)]
        out.append({**obj, "metadata": {**obj["metadata"], "name": PREFIX + obj["metadata"]["name"]},
                    "webhooks": hooks})
    return out


def cluster_queue(name: str, cpu: str, memory: str, gpus: int, namespaces: list[str] | None = None,
                  flavor: str = "default") -> dict:
    """A ClusterQueue with nominal quota for cpu, memory and nvidia.com/gpu in one flavor; it takes workloads
    from every namespace, or from `namespaces` only."""
    selector = ({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                       "values": namespaces}]} if namespaces else {})
    quota = {"cpu": str(cpu), "memory": str(memory), "nvidia.com/gpu": str(gpus)}
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": name},
            "spec": {"namespaceSelector": selector, "resourceGroups": [{
                "coveredResources": list(quota),
                "flavors": [{"name": flavor, "resources": [{"name": k, "nominalQuota": v} for k, v in quota.items()]}],
            }]}}


def resource_flavor(name: str = "default") -> dict:
    """A flavor with no node labels: every node of the cluster offers it."""
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": name}}


def local_queue(name: str, namespace: str, cluster_queue_name: str) -> dict:
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue_name}}


def default_queues_manifest(cpu: str, memory: str, gpus: int) -> dict:
    """A List of the ResourceFlavor `default` and the ClusterQueue `default` (quota: the node's capacity), for
    `kubectl apply -f -` after `start()`. Kueue admits nothing until a namespace has a LocalQueue pointing at a
    ClusterQueue; a test makes one in its namespace and names it in the Job's `kueue.x-k8s.io/queue-name` label
    (a QLoRAFinetune's spec.runtime.queueName):

        kubectl apply -f - <<< "$(python -c 'import kueue, json;
            print(json.dumps(kueue.local_queue("gpu-queue", "NAMESPACE", "default")))')"

    A test that wants its own quota makes its own ClusterQueue with `cluster_queue(name, cpu, memory, gpus,
    namespaces=[its namespace])` (ClusterQueues are cluster-wide: name it after the namespace)."""
    return {"apiVersion": "v1", "kind": "List", "items": [resource_flavor(), cluster_queue("default", cpu, memory, gpus)]}


# ---------------------------------------------------------------------------------------------- cluster I/O

class Kubectl:
    """The cluster's kubectl with its admin kubeconfig (DIR/bin/kubectl, DIR/kubeconfig)."""

    def __init__(self, cluster_dir: Path):
        self.argv = [str(cluster_dir / "bin" / "kubectl"), "--kubeconfig", str(cluster_dir / "kubeconfig")]

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.argv, *args], input=input, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise KueueError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
        return proc

    def read(self, path: Path) -> list[dict]:
        """The objects of a YAML file or folder, as JSON (kubectl is the YAML parser: no PyYAML in the stdlib)."""
        text, objs, at = self("create", "--dry-run=client", "-o", "json", "-f", str(path)).stdout, [], 0
        while text[at:].strip():  # one JSON document after another
            obj, at = json.JSONDecoder().raw_decode(text, len(text) - len(text[at:].lstrip()))
            objs += obj["items"] if obj.get("kind") == "List" else [obj]
        return objs

    def apply(self, objs: list[dict]) -> None:
        # server-side: the CRDs are too large for client-side apply's last-applied annotation
        self("apply", "--server-side", "--force-conflicts", "--field-manager=localcluster-kueue", "-f", "-",
             input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))


def serving_files(pki: Path, work: Path) -> None:
    """Client certificate (the manager's user) and serving certificate (webhooks, metrics), both of the cluster CA;
    the serving pair also where Kueue insists on finding its metrics certificate, in the overlay."""
    lc.issue_cert(pki, "kueue", f"/CN={USER}", client=True)
    lc.issue_cert(pki, "kueue-serving", "/CN=kueue-webhook", ["IP:127.0.0.1", "DNS:localhost"])
    for d in (work / "certs", work / "etc" / "kueue" / "metrics" / "certs"):
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pki / "kueue-serving.crt", d / "tls.crt")
        shutil.copyfile(pki / "kueue-serving.key", d / "tls.key")
        (d / "tls.key").chmod(0o600)


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def wait(what: str, check, pid: int, log: Path, timeout: float) -> None:
    """Poll check() -> (ok, detail) until ok; fail naming Kueue, what it waited for, and its log tail."""
    deadline, detail = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if not lc.alive(pid):
            raise KueueError(f"kueue exited while waiting for {what}\n--- last lines of {log} ---\n{lc.tail(log)}")
        ok, detail = check()
        if ok:
            return
        time.sleep(0.3)
    raise KueueError(f"kueue: no {what} within {timeout:.0f}s ({detail})\n--- last lines of {log} ---\n{lc.tail(log)}")


def start(cluster_dir: Path, server: str, pki: Path, bin: Path, log: Path, timeout: float) -> tuple[int, dict]:
    """Install Kueue's CRDs, RBAC and webhooks into the cluster and start the manager; return (pid, ports)."""
    if os.geteuid() != 0:
        raise KueueError("starting Kueue needs root (a mount namespace gives it /etc/kueue/metrics/certs)")
    work, kubectl, manifests = cluster_dir / "kueue", Kubectl(cluster_dir), bin.parent / "config"
    work.mkdir(exist_ok=True)
    serving_files(pki, work)
    ca_bundle = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
    ports = {"webhook": lc.free_port(), "health": lc.free_port(), "metrics": lc.free_port()}
    (work / "kubeconfig").write_text(lc.kubeconfig(server, pki, "kueue"))
    (work / "config.yaml").write_text(json.dumps(config(ports, work / "certs"), indent=1))  # JSON is YAML

    crds = [with_conversion_webhook(c, ports["webhook"], ca_bundle) for c in kubectl.read(manifests / "crd/bases")]
    roles = [obj for rel in ROLES for obj in kubectl.read(manifests / rel)]
    kubectl("create", "namespace", NAMESPACE, check=False)  # as upstream: its Secrets Role lives there
    kubectl.apply(crds + rbac(roles))
    kubectl("wait", "--for=condition=Established", f"--timeout={int(timeout)}s",
            *[f"crd/{c['metadata']['name']}" for c in crds])

    log.parent.mkdir(parents=True, exist_ok=True)
    mount = 'mount -t overlay kueue-etc -o "lowerdir=$0:/etc" /etc && exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", mount, str(work / "etc"),
            str(bin), f"--config={work / 'config.yaml'}", f"--kubeconfig={work / 'kubeconfig'}", "--zap-log-level=2"]
    with open(log, "ab") as out:
        pid = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=work,
                               start_new_session=True).pid
    try:
        health = f"http://127.0.0.1:{ports['health']}"
        wait("readiness", lambda: (get(f"{health}/readyz") == 200 == get(f"{health}/healthz"), "/readyz"),
             pid, log, timeout)
        kubectl.apply(webhook_configurations(kubectl.read(manifests / "webhook/manifests.yaml"),
                                             ports["webhook"], ca_bundle))
        probe = json.dumps({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                            "metadata": {"name": "kueue-webhook-probe"}})
        wait("answer from its webhook to the API server", lambda: (lambda p: (p.returncode == 0, p.stderr.strip()))(
            kubectl("create", "--dry-run=server", "-f", "-", input=probe, check=False)), pid, log, timeout)
    except KueueError:
        stop(cluster_dir, pid)
        raise
    say(f"ready: pid {pid}, webhooks https://127.0.0.1:{ports['webhook']}, health {ports['health']}, "
        f"{lc.rss_bytes(pid) / 2**20:.0f} MiB; log {log}")
    return pid, ports


def stop(cluster_dir: Path, pid: int | None) -> None:
    """Unregister the webhooks (Jobs would fail to be created while they point nowhere), then stop the manager."""
    Kubectl(cluster_dir)("delete", "--ignore-not-found", *[f"{k}/{n}" for k, n in zip(
        ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"), WEBHOOK_CONFIGS)], check=False)
    if pid:
        lc.stop_group(pid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "start", "stop"])
    ap.add_argument("--dir", default=".localcluster", help="the cluster's folder (localcluster.py up --dir)")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    d = Path(args.dir).absolute()
    state = d / "kueue" / "state.json"
    try:
        if args.command == "stop":
            stop(d, json.loads(state.read_text())["pid"] if state.exists() else None)
            return 0
        go = lc.find_go()
        if go is None:
            raise KueueError("the Go toolchain is missing; install Go 1.25 or newer, or set GO=/path/to/go")
        if args.command == "build":
            print(build(go))
            return 0
        c = lc.Cluster.load(d)
        if c is None:
            raise KueueError(f"no cluster in {d}; run localcluster.py up --dir {d} first")
        pid, ports = start(d, c.server, c.pki, build(go), c.logs / "kueue.log", args.timeout)
        state.write_text(json.dumps({"pid": pid, "ports": ports}))
        print(json.dumps({"pid": pid, "ports": ports}))
    except KueueError as e:
        say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
