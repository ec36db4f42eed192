"""The Helm chart on a real API server: install, a run to Succeeded, minimal RBAC, upgrade, uninstall.

`helm install` puts the operator in as the chart's Deployment; the node runs the operator image (built from
Dockerfile.operator) as the chart says (non-root, read-only root filesystem) with the pod's projected
ServiceAccount token, so every API call it makes is authorised by the chart's RBAC and nothing else. A QLoRAFinetune then runs (trainer stood in by
tests/cluster/standin through `trainer.image`) to `Succeeded`: the RBAC is enough.

Minimal: the operator, run under the chart's ServiceAccount token through a recording proxy, goes through a
scenario that reaches every code path that calls the API (a run with a token Secret, a dataset ConfigMap and
PVCs; a multi-node run whose children exist already and are adopted; suspend; a Job removed by its TTL).
Every request is mapped to (group, resource, verb) the way the API server's authorizer sees it; each verb of
each rule of the chart was used, and no request was refused.

The tests of this module run in order on one release: install, run, RBAC, upgrade, uninstall.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import threading
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs

import pytest
import yaml

from tests.cluster.operator_fixture import OperatorProcess, crd, finetune, standin_image  # noqa: F401

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "qlora-operator"
HEALTH_SCRIPT = REPO / "docs" / "argocd-health.lua"
RELEASE = "qlora"
BASE_MODEL = "test-org/tiny-model"
LABEL = "qlora.io/finetune"


# ------------------------------------------------------------------------------------------- helpers

@dataclass
class Release:
    cluster: object
    namespace: str
    name: str = RELEASE
    notes: str = ""
    installed: bool = True

    def helm(self, *args: str, check: bool = True, timeout: float = 300):
        cmd = [self.cluster.bin("helm"), "--kubeconfig", str(self.cluster.kubeconfig), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.cluster.env)
        if check:
            assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    @property
    def fullname(self) -> str:
        return f"{self.name}-qlora-operator"

    def kubectl(self, *args: str, **kw):
        return self.cluster.kubectl(*args, namespace=self.namespace, **kw)

    def operator_pods(self) -> list[dict]:
        return self.cluster.kubectl_json("get", "pods", "-l", f"app.kubernetes.io/instance={self.name}",
                                         namespace=self.namespace)["items"]


def helm_values(**overrides) -> list[str]:
    values = {"trainer.image": "qlora-standin:1", "defaults.baseModel": BASE_MODEL,
              "metrics.scrapeInterval": "1", "status.minInterval": "1", **overrides}
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def wait_operator_ready(release: Release, timeout: float = 120) -> dict:
    """The operator pod once it runs and answers /healthz on its pod IP (the liveness probe's target)."""
    def ready():
        for pod in release.operator_pods():
            ip = (pod.get("status") or {}).get("podIP")
            if pod["status"].get("phase") != "Running" or not ip or pod["metadata"].get("deletionTimestamp"):
                continue
            try:
                with urllib.request.urlopen(f"http://{ip}:8081/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return pod
            except OSError:
                continue
        return None
    return release.cluster.wait_until(ready, timeout=timeout, what="the operator pod to answer /healthz")


def inputs(cluster, ns: str) -> None:
    """What a run names: a dataset ConfigMap, an output volume, a model volume and a token Secret."""
    cluster.kubectl("create", "configmap", "qa", "--from-literal=data.jsonl=" + json.dumps(
        {"question": "What is QLoRA?", "answer": "Low-rank adapters on a 4-bit model."}), namespace=ns)
    for claim in ("adapters", "models"):
        cluster.kubectl("apply", "-f", "-", namespace=ns, input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
    cluster.kubectl("create", "secret", "generic", "hf", "--from-literal=HF_TOKEN=hf_notarealtoken0123456789",
                    namespace=ns)


def apply(cluster, ns: str, obj: dict) -> dict:
    cluster.kubectl("apply", "-f", "-", namespace=ns, input=json.dumps(obj))
    return cluster.kubectl_json("get", obj["kind"].lower(), obj["metadata"]["name"], namespace=ns)


def get_finetune(cluster, ns: str, name: str) -> dict:
    return cluster.kubectl_json("get", "qlorafinetune", name, namespace=ns)


def wait_phase(cluster, ns: str, name: str, phase: str, timeout: float = 120, seen: list | None = None) -> dict:
    """The resource once its phase is `phase`; `seen` collects every object sampled on the way."""
    def reached():
        obj = get_finetune(cluster, ns, name)
        if seen is not None:
            seen.append(obj)
        return obj if (obj.get("status") or {}).get("phase") == phase else None
    return cluster.wait_until(reached, timeout=timeout,
                              what=f"{ns}/{name} to be {phase} (last: {get_finetune(cluster, ns, name).get('status')})")


def argocd_health(obj: dict) -> dict:
    """docs/argocd-health.lua run as Argo CD runs it (Lua 5.1, the object as the global `obj`)."""
    try:
        from lupa import lua51
    except ImportError:
        pytest.fail("lupa (Lua in Python) is missing: pip install lupa")
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value

    runtime.globals().obj = to_lua(obj)
    return dict(runtime.execute(HEALTH_SCRIPT.read_text()))


def release_objects(cluster, release_name: str) -> set[tuple[str, str, str]]:
    """(kind, namespace, name) of every object in the cluster labelled as the release's."""
    kinds = "deployments,replicasets,pods,services,serviceaccounts,configmaps,secrets,roles,rolebindings,leases"
    found = set()
    selector = f"app.kubernetes.io/instance={release_name},app.kubernetes.io/part-of=qlora-operator"
    for item in cluster.kubectl_json("get", kinds, "-A", "-l", selector)["items"]:
        if item["kind"] == "Pod" and item["metadata"].get("deletionTimestamp"):
            continue
        found.add((item["kind"], item["metadata"].get("namespace", ""), item["metadata"]["name"]))
    for item in cluster.kubectl_json("get", "clusterroles,clusterrolebindings", "-l", selector)["items"]:
        found.add((item["kind"], "", item["metadata"]["name"]))
    return found


def manifest_objects(release: Release) -> set[tuple[str, str, str]]:
    """(kind, namespace, name) of what the release's current manifest says, from `helm get manifest`."""
    docs = [d for d in yaml.safe_load_all(release.helm("get", "manifest", release.name, "-n",
                                                       release.namespace).stdout) if d]
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    return {(d["kind"], "" if d["kind"] in cluster_scoped else d["metadata"].get("namespace", release.namespace),
             d["metadata"]["name"]) for d in docs}


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


# ----------------------------------------------------------------------------------- recording proxy

@dataclass
class Call:
    method: str
    path: str
    query: dict
    status: int
    message: str = ""  # the API server's message, for refusals

    @property
    def denied_by_rbac(self) -> bool:
        # 403 also answers a create in a namespace being deleted (admission, not RBAC): only the authorizer's
        # refusal says what the user cannot do.
        return self.status == 401 or (self.status == 403 and " cannot " in self.message)

    @property
    def attributes(self) -> tuple[str, str, str] | None:
        """(apiGroup, resource[/subresource], verb) as the API server's RBAC authorizer sees the request;
        None for non-resource URLs (discovery, /version), which every authenticated user may read."""
        parts = [p for p in self.path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            return None
        if not rest:
            return None
        if rest[0] == "namespaces" and len(rest) >= 3:
            rest = rest[2:]
        resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
        watch = self.query.get("watch", [""])[0] in ("true", "1")
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(self.method)
        if self.method == "GET":
            verb = "watch" if watch else ("get" if name else "list")
        elif self.method == "DELETE":
            verb = "delete" if name else "deletecollection"
        return group, resource + (f"/{sub}" if sub else ""), verb


@dataclass
class RecordingProxy:
    """A plain-HTTP proxy on loopback in front of the API server that records every request and its status.

    The operator is pointed at it with a kubeconfig holding the ServiceAccount's token; the proxy passes the
    token on unchanged, so the API server authorises each request as that ServiceAccount."""

    upstream: str
    ca_file: str
    calls: list[Call] = field(default_factory=list)
    port: int = 0

    def start(self) -> RecordingProxy:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(30), "the recording proxy did not start"
        return self

    def _serve(self, started: threading.Event) -> None:
        from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

        asyncio.set_event_loop(self._loop)
        context = ssl.create_default_context(cafile=self.ca_file)
        hop = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "keep-alive"}

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
            async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                             data=body or None, allow_redirects=False) as upstream:
                call = Call(request.method, request.path, parse_qs(request.query_string), upstream.status)
                self.calls.append(call)
                if upstream.status >= 400:
                    text = (await upstream.read()).decode(errors="replace")
                    call.message = text
                    return web.Response(status=upstream.status, text=text,
                                        content_type=upstream.content_type or "application/json")
                response = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in hop | {"content-encoding"}})
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
                except (ConnectionError, ClientError):
                    pass  # a watch ended: closed by the operator, or by the proxy stopping
                return response

        async def main():
            self._session = ClientSession(connector=TCPConnector(ssl=context), timeout=ClientTimeout(total=None),
                                          auto_decompress=False)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            started.set()

        self._loop.run_until_complete(main())
        self._loop.run_forever()

    def stop(self) -> None:
        async def close():
            await self._session.close()  # ends the watches still open upstream
            await self._runner.cleanup()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


def cluster_endpoint(cluster) -> tuple[str, str]:
    """(API server URL, CA file) from the cluster's admin kubeconfig."""
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    (entry,) = config["clusters"][:1]
    ca = entry["cluster"].get("certificate-authority")
    if not ca:
        import base64
        import tempfile

        handle = tempfile.NamedTemporaryFile("wb", suffix=".crt", delete=False)
        handle.write(base64.b64decode(entry["cluster"]["certificate-authority-data"]))
        handle.close()
        ca = handle.name
    elif not Path(ca).is_absolute():
        ca = str(Path(cluster.kubeconfig).parent / ca)
    return entry["cluster"]["server"], ca


def token_kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "proxy", "cluster": {"server": server}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "proxy", "user": "sa"}}],
    }))
    return path


@pytest.mark.parametrize("method,url,expected", [
    ("GET", "/apis/qlora.io/v1alpha1/qlorafinetunes?watch=true&resourceVersion=5", ("qlora.io", "qlorafinetunes", "watch")),
    ("GET", "/apis/batch/v1/jobs?labelSelector=qlora.io%2Ffinetune", ("batch", "jobs", "list")),
    ("GET", "/api/v1/namespaces/ml/secrets/hf", ("", "secrets", "get")),
    ("POST", "/api/v1/namespaces/ml/events", ("", "events", "create")),
    ("PATCH", "/apis/qlora.io/v1alpha1/namespaces/ml/qlorafinetunes/run/status", ("qlora.io", "qlorafinetunes/status",
                                                                                  "patch")),
    ("DELETE", "/apis/batch/v1/namespaces/ml/jobs", ("batch", "jobs", "deletecollection")),
    ("GET", "/api/v1/namespaces/ml", ("", "namespaces", "get")),
    ("GET", "/apis/qlora.io/v1alpha1", None),
    ("GET", "/version", None),
])
def test_requests_map_to_what_the_authorizer_checks(method, url, expected):
    path, _, query = url.partition("?")
    assert Call(method, path, parse_qs(query), 200).attributes == expected


# ------------------------------------------------------------------------------------------- fixture

@pytest.fixture(scope="module")
def release(cluster, standin_image):
    """The chart installed with its defaults (cluster-wide), but the stand-in trainer and a test base model."""
    cluster.load("operator")  # the image the chart's defaults name, built from Dockerfile.operator
    ns = f"qlora-system-{uuid.uuid4().hex[:6]}"
    # The Pod Security Standards' "restricted" profile, enforced by the API server's PodSecurity admission:
    # an operator pod that broke it would never be created.
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")
    rel = Release(cluster, ns)
    out = rel.helm("install", RELEASE, str(CHART), "--namespace", ns, "--wait", "--timeout", "5m", *helm_values())
    rel.notes = out.stdout
    try:
        yield rel
    finally:
        if rel.installed:
            rel.helm("uninstall", RELEASE, "--namespace", ns, "--wait", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def workload_ns(cluster):
    """A namespace for the runs of this module, with their inputs."""
    ns = f"helm-runs-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.wait_until(lambda: cluster.kubectl("get", "serviceaccount", "default", namespace=ns, check=False)
                       .returncode == 0, timeout=60, what=f"the default ServiceAccount of {ns}")
    inputs(cluster, ns)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# ------------------------------------------------------------------------------------------- install

def test_install_notes_tell_the_next_command(release):
    notes = release.notes.split("NOTES:", 1)[1]
    assert f"kubectl -n {release.namespace} rollout status deployment/{release.fullname}" in notes
    assert "kubectl apply -n default -f examples/minimal.yaml" in notes
    assert "kubectl wait --for=condition=Succeeded" in notes
    assert "It serves QLoRAFinetunes in every namespace." in notes


def test_operator_runs_as_the_charts_deployment_under_its_service_account(release, cluster):
    pod = wait_operator_ready(release)
    labels = cluster.kubectl_json("get", "namespace", release.namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert pod["spec"]["serviceAccountName"] == release.fullname
    # What the ServiceAccount may do, as the API server's authorizer answers it.
    sa = f"system:serviceaccount:{release.namespace}:{release.fullname}"
    for verb, resource, allowed in (("create", "jobs.batch", True), ("watch", "pods", True),
                                    ("patch", "qlorafinetunes.qlora.io --subresource=status", True),
                                    ("update", "qlorafinetunes.qlora.io --subresource=finalizers", True),
                                    ("get", "secrets", False), ("list", "secrets", False),
                                    ("delete", "jobs.batch", False), ("create", "pods", False),
                                    ("update", "qlorafinetunes.qlora.io", False)):
        answer = cluster.kubectl("auth", "can-i", verb, *resource.split(), "--as", sa, "-n", "default",
                                 check=False)
        assert answer.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, answer.stdout)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/qlora-operator/qlora-operator:0.1.0"
    assert "command" not in container, "the image's entrypoint runs the operator"
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/metrics", timeout=5) as resp:
        assert "qlora_operator_finetunes" in resp.read().decode()
    deployment = cluster.kubectl_json("get", "deployment", release.fullname, namespace=release.namespace)
    assert deployment["status"].get("availableReplicas") == 1


def test_finetune_runs_to_succeeded_under_the_charts_rbac(release, cluster, workload_ns):
    wait_operator_ready(release)
    seen: list[dict] = []
    apply(cluster, workload_ns, finetune("helm-run", env={"STANDIN_SLEEP": 6},
                                         model={"tokenSecretRef": {"name": "hf", "key": "HF_TOKEN"}}))
    wait_phase(cluster, workload_ns, "helm-run", "Running", seen=seen)
    done = wait_phase(cluster, workload_ns, "helm-run", "Succeeded", seen=seen)
    cluster.kubectl("wait", "--for=condition=Succeeded", "qft/helm-run", "--timeout=10s", namespace=workload_ns)
    # The chart's values reached the operator: the trainer image and the default base model.
    (job,) = cluster.kubectl_json("get", "jobs", "-l", f"{LABEL}=helm-run", namespace=workload_ns)["items"]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "qlora-standin:1"
    assert done["status"]["model"]["name"] == BASE_MODEL
    # Argo CD's view of the same objects, as the API server returned them.
    running = [o for o in seen if (o.get("status") or {}).get("phase") == "Running"]
    assert running and all(argocd_health(o)["status"] == "Progressing" for o in running)
    assert argocd_health(done)["status"] == "Healthy"
    # Nothing the operator asked for was refused by the authorizer ("... cannot <verb> resource ...").
    log = release.kubectl("logs", f"deployment/{release.fullname}").stdout
    assert not re.search(r"system:serviceaccount:\S+ cannot", log), log[-3000:]


def test_failed_run_is_degraded_in_argocd(release, cluster, workload_ns):
    apply(cluster, workload_ns, finetune("helm-bad-data", env={"STANDIN_EXIT": 65,
                                                               "STANDIN_MESSAGE": "line 3: not JSON"}))
    failed = wait_phase(cluster, workload_ns, "helm-bad-data", "Failed")
    health = argocd_health(failed)
    assert health["status"] == "Degraded"
    assert health["message"].startswith("DatasetInvalid")


# ------------------------------------------------------------------------------------------ RBAC

def test_rbac_is_minimal_every_rule_is_used_and_nothing_is_refused(release, cluster, workload_ns, tmp_path):
    """Run the operator under the chart's ServiceAccount through a recording proxy, over a scenario that
    reaches each API call of the operator, then hold the recorded requests against the chart's rules."""
    from qlora_operator import builders

    role = cluster.kubectl_json("get", "clusterrole", release.fullname)
    # ... and the Role that lets it read and renew its leader Lease (the chart's operator hands it back below).
    leader = cluster.kubectl_json("get", "role", f"{release.fullname}-leader", namespace=release.namespace)
    granted = rules_of(role) | rules_of(leader)
    # The chart's own operator steps aside, so that only the recorded one acts.
    release.kubectl("scale", f"deployment/{release.fullname}", "--replicas=0")
    cluster.wait_until(lambda: not [p for p in release.operator_pods()
                                    if not p["metadata"].get("deletionTimestamp")] and not release.operator_pods(),
                       timeout=90, what="the chart's operator pod to go")
    ns = workload_ns
    # Set up before the operator starts: a multi-node run whose ConfigMap and Service exist already (an
    # interrupted create), so the operator adopts them (get, and patch for the stale config).
    multi = apply(cluster, ns, finetune("rbac-multi", env={"STANDIN_SLEEP": 1},
                                        resources={"gpus": 0, "nodes": 2}))
    owner = builders.Owner(name="rbac-multi", namespace=ns, uid=multi["metadata"]["uid"])
    for child in builders.build_children(owner, _spec(multi), _settings()):
        if child["kind"] == "ConfigMap":
            child["data"] = {key: "{}" for key in child["data"]}
        if child["kind"] in ("ConfigMap", "Service"):
            cluster.kubectl("create", "-f", "-", namespace=ns, input=json.dumps(child))
    apply(cluster, ns, finetune("rbac-full", env={"STANDIN_SLEEP": 1},
                                model={"tokenSecretRef": {"name": "hf", "key": "HF_TOKEN"},
                                       "pvc": {"claimName": "models", "path": "base"}}))
    apply(cluster, ns, finetune("rbac-suspend", env={"STANDIN_SLEEP": 600}))
    # A finished run whose Job the TTL controller removes: its verdict stands (tests/unit/test_reporter.py shows
    # that it costs no call for the Job).
    apply(cluster, ns, finetune("rbac-ttl", env={"STANDIN_SLEEP": 1}, runtime={"ttlSecondsAfterFinished": 5}))

    token = cluster.kubectl("create", "token", release.fullname, "--duration=1h",
                            namespace=release.namespace).stdout.strip()
    server, ca = cluster_endpoint(cluster)
    proxy = RecordingProxy(server, ca).start()
    kubeconfig = token_kubeconfig(tmp_path / "sa.kubeconfig", f"http://127.0.0.1:{proxy.port}", token)
    shim = SimpleNamespace(env={**cluster.env, "KUBECONFIG": str(kubeconfig)})
    operator = OperatorProcess(shim, (), trainer_image="qlora-standin:1", default_base_model=BASE_MODEL,
                               leader_lease=f"{release.namespace}/{release.fullname}")
    scenario_error: BaseException | None = None
    try:
        operator.start()
        wait_phase(cluster, ns, "rbac-full", "Succeeded")
        wait_phase(cluster, ns, "rbac-multi", "Succeeded")
        wait_phase(cluster, ns, "rbac-suspend", "Running")
        cluster.kubectl("patch", "qft", "rbac-suspend", "--type=merge", "-p", '{"spec":{"suspend":true}}',
                        namespace=ns)
        wait_phase(cluster, ns, "rbac-suspend", "Suspended")
        # Its Job deleted by hand: the operator looks it up (the watch may only lag) before it says the Job
        # is gone and the outcome unknown.
        cluster.kubectl("delete", "job", "rbac-suspend", namespace=ns)
        wait_phase(cluster, ns, "rbac-suspend", "Unknown")
        wait_phase(cluster, ns, "rbac-ttl", "Succeeded")
        cluster.wait_until(lambda: not cluster.kubectl_json("get", "jobs", "-l", f"{LABEL}=rbac-ttl",
                                                            namespace=ns)["items"],
                           timeout=120, what="the TTL controller to delete the Job of rbac-ttl")
        wait_phase(cluster, ns, "rbac-ttl", "Succeeded")  # the verdict stands without its Job
        events = cluster.kubectl_json("get", "events", "--field-selector", "involvedObject.name=rbac-full",
                                      namespace=ns)["items"]
        assert events, "the operator posted no Event"
    except BaseException as err:  # a refusal explains a stuck scenario better than its timeout: report it first
        scenario_error = err
    finally:
        operator.stop()
        proxy.stop()
        cluster.kubectl("delete", "qft", "rbac-suspend", "--wait=false", namespace=ns, check=False)
        release.kubectl("scale", f"deployment/{release.fullname}", "--replicas=1")

    refused = [c for c in proxy.calls if c.denied_by_rbac]
    assert not refused, "refused: " + ", ".join(f"{c.method} {c.path}: {c.message[:200]}" for c in refused)
    if scenario_error is not None:
        raise scenario_error
    used = {c.attributes for c in proxy.calls if c.attributes}
    # Asked by the OwnerReferencesPermissionEnforcement admission plugin (on in the local cluster, as on
    # OpenShift) of every child created with blockOwnerDeletion: without it, those creates are refused above.
    if any(c.method == "POST" and c.path.endswith("/jobs") and c.status == 201 for c in proxy.calls):
        used.add(("qlora.io", "qlorafinetunes/finalizers", "update"))
    unused = granted - used
    assert not unused, f"rules the operator never used (remove them from the chart): {sorted(unused)}\n{operator.log()[-3000:]}"
    ungranted = used - granted
    assert not ungranted, f"calls outside the rules (a 403 in another cluster): {sorted(ungranted)}"
    # The watches of Jobs and pods ask for the operator's own only (a server-side label selector), not for
    # every Job and pod of the cluster.
    child_watches = [c for c in proxy.calls if c.query.get("watch") and c.path.rsplit("/", 1)[-1] in ("jobs", "pods")]
    assert child_watches, "no watch of Jobs or pods went through the proxy"
    assert all(c.query.get("labelSelector") == [builders.LABEL_FINETUNE] for c in child_watches), \
        sorted({(c.path, str(c.query.get("labelSelector"))) for c in child_watches})
    # Nothing cluster-wide besides the watches and lists of the operator's own kinds.
    cluster_wide = {c.attributes for c in proxy.calls if c.attributes and "/namespaces/" not in c.path}
    assert {verb for _, _, verb in cluster_wide} <= {"list", "watch"}


def _spec(obj: dict):
    from qlora_operator.api import QLoRAFinetuneSpec

    return QLoRAFinetuneSpec.model_validate(obj["spec"])


def _settings():
    from qlora_operator.settings import Settings

    return Settings(trainer_image="qlora-standin:1", default_base_model=BASE_MODEL)


# ------------------------------------------------------------------------------- upgrade, uninstall

def test_upgrade_to_namespaced_leaves_no_orphans_and_runs_there(release, cluster, workload_ns):
    before = {o for o in release_objects(cluster, release.name) if o[0] in ("Pod", "ReplicaSet")}
    release.helm("upgrade", release.name, str(CHART), "--namespace", release.namespace, "--wait", "--timeout",
                 "5m", *helm_values(**{"watchNamespaces[0]": workload_ns}))
    # The ClusterRole and its binding are gone; a Role and RoleBinding serve the one namespace.
    objects = {o for o in release_objects(cluster, release.name) if o[0] not in ("Pod", "ReplicaSet")}
    assert objects == manifest_objects(release)
    kinds = {kind for kind, _, _ in objects}
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert ("Role", workload_ns, release.fullname) in objects
    # Recreate: the new operator pod replaced the old one, with the new setting.
    pod = wait_operator_ready(release)
    assert ("Pod", release.namespace, pod["metadata"]["name"]) not in before
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["QLORA_WATCH_NAMESPACES"] == workload_ns
    cluster.wait_until(lambda: len([p for p in release.operator_pods()
                                    if not p["metadata"].get("deletionTimestamp")]) == 1,
                       timeout=90, what="one operator pod")
    # Under the Role alone, a run in the watched namespace still runs to Succeeded.
    apply(cluster, workload_ns, finetune("helm-namespaced", env={"STANDIN_SLEEP": 1}))
    wait_phase(cluster, workload_ns, "helm-namespaced", "Succeeded")
    # Earlier runs are untouched by the upgrade.
    assert get_finetune(cluster, workload_ns, "helm-run")["status"]["phase"] == "Succeeded"


def test_uninstall_leaves_nothing_but_the_crd_and_the_runs(release, cluster, workload_ns):
    release.helm("uninstall", release.name, "--namespace", release.namespace, "--wait")
    release.installed = False
    cluster.wait_until(lambda: not release_objects(cluster, release.name), timeout=120,
                       what=f"every object of release {release.name} to go "
                            f"(left: {release_objects(cluster, release.name)})")
    # Helm never deletes crds/: the CRD, and with it every run's record, outlive the operator.
    crd_obj = cluster.kubectl_json("get", "crd", "qlorafinetunes.qlora.io")
    assert crd_obj["metadata"]["name"] == "qlorafinetunes.qlora.io"
    assert get_finetune(cluster, workload_ns, "helm-run")["status"]["phase"] == "Succeeded"
    assert release.helm("status", release.name, "--namespace", release.namespace, check=False).returncode != 0


# ------------------------------------------------------------------------------- admission policy

def test_admission_policy_lets_users_create_runs_only_with_what_they_may_use(cluster, crd, namespace):
    """The chart's optional ValidatingAdmissionPolicy (admissionPolicy.enabled) on the real API server: a user
    who may create QLoRAFinetunes but not pods, not the Secrets or ServiceAccount a run names, or an image off
    the allowlist, is refused at `kubectl apply` with the reason."""
    out = helm_output([cluster.bin("helm"), "template", "qft", str(CHART),
                          "--show-only", "templates/admissionpolicy.yaml",
                          "--set", "admissionPolicy.enabled=true",
                          "--set", "admissionPolicy.allowedImagePrefixes={qlora-standin}",
                          "--set", f"watchNamespaces={{{namespace}}}"])
    policy = [d for d in yaml.safe_load_all(out) if d]
    names = [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in policy]

    def as_alice(*args, user="alice"):
        return cluster.kubectl(*args, "--as", user, namespace=namespace, check=False)

    def create(body, user="alice"):
        """The API server's answer to a create (dry run: nothing is stored), as `user` (None: the admin)."""
        args = ("create", "--dry-run=server", "-f", "-")
        if user is None:
            return cluster.kubectl(*args, namespace=namespace, input=json.dumps(body), check=False)
        return cluster.kubectl(*args, "--as", user, namespace=namespace, input=json.dumps(body), check=False)

    grant = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "alice"},
             "rules": [{"apiGroups": ["qlora.io"], "resources": ["qlorafinetunes"], "verbs": ["create"]}]}
    cluster.kubectl("apply", "-f", "-", namespace=namespace, input=json.dumps(grant))
    cluster.kubectl("create", "rolebinding", "alice", "--role=alice", "--user=alice", namespace=namespace)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": policy}))
    try:
        plain = finetune("p", "qlora-standin:1")
        refused = cluster.wait_until(lambda: (lambda r: r if r.returncode else None)(create(plain)), timeout=60,
                                     what="the policy to take effect")
        assert "you may not create pods in namespace" in refused.stderr
        grant["rules"].append({"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]})
        grant["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                               "resourceNames": ["hf"]})
        cluster.kubectl("apply", "-f", "-", namespace=namespace, input=json.dumps(grant))
        cluster.wait_until(lambda: create(plain).returncode == 0, timeout=30, what="alice's new rights")
        mine = finetune("t", "qlora-standin:1", model={"tokenSecretRef": {"name": "hf"}})
        assert create(mine).returncode == 0
        for body, said in (
            (finetune("o", "qlora-standin:1", model={"tokenSecretRef": {"name": "other"}}),
             "you may not read Secret other"),
            (finetune("e", "qlora-standin:1", runtime={"env": [
                {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}}]}),
             "a secretKeyRef names a Secret you may not read"),
            (finetune("s", "qlora-standin:1", runtime={"serviceAccountName": "deployer"}),
             "you may not act as ServiceAccount deployer"),
            (finetune("i", "registry.example/miner:1"), "registry.example/miner:1 is not allowed here"),
        ):
            answer = create(body)
            assert answer.returncode != 0 and said in answer.stderr, (said, answer.stderr)
        # The admin may use any Secret and ServiceAccount, but no image off the list either.
        assert create(finetune("a", "qlora-standin:1", runtime={"serviceAccountName": "deployer"}),
                      user=None).returncode == 0
        assert "is not allowed here" in create(finetune("b", "registry.example/miner:1"), user=None).stderr
        assert as_alice("auth", "can-i", "create", "qlorafinetunes.qlora.io").stdout.strip() == "yes"
    finally:
        cluster.kubectl("delete", *names, "--ignore-not-found", check=False)


def helm_output(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
