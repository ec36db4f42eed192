"""The Helm chart, rendered by the real `helm` with default and non-default values and checked object by object.

No cluster: `helm lint` and `helm template` only. The chart is also cross-checked against the code it deploys:
the environment it gives the operator parses (with the operator's own settings loader) to the values it was
given, its PodMonitor selects the pods the operator's builders make, its dashboard and alerts use only metrics
the trainer and operator export, and its alerts fire (promtool's rule tests) when a run fails or stalls.
The cluster test (tests/cluster/test_helm.py) installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "qlora-operator"
KUBE_VERSION = "1.37.0"
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
NON_DEFAULT = {
    "watchNamespaces": ["team-a", "team-b"],
    "trainer": {"image": "registry.example.com/ml/qlora-trainer:9.9.9"},
    "defaults": {"baseModel": "Qwen/Qwen2.5-0.5B-Instruct"},
    "prometheus": {"url": "http://prometheus-operated.monitoring:9090"},
    "metrics": {"scrapeInterval": 30, "port": 9100},
    "status": {"minInterval": 2.5},
    "health": {"port": 9101},
    "logLevel": "DEBUG",
    "image": {"repository": "registry.example.com/ml/qlora-operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"name": "trainer-bot", "annotations": {"iam.example.com/role": "qlora"}},
    "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "priorityClassName": "system-cluster-critical",
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
    "podMonitor": {"enabled": True, "interval": "10s", "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "stalledFor": "20m", "labels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "ML"}},
}


# ---------------------------------------------------------------------------------------------- helm

@pytest.fixture(scope="session")
def helm() -> str:
    """The helm the local cluster builds from Go modules (cached; the first build takes minutes), or $HELM."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    proc = subprocess.run([sys.executable, str(REPO / "hack/localcluster/localcluster.py"), "build"],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"building helm failed:\n{proc.stdout}\n{proc.stderr}"
    bin_dir = Path((proc.stdout.strip() or proc.stderr.strip()).splitlines()[-1].rsplit(": ", 1)[-1])
    return str(bin_dir / "helm")


def run_helm(helm: str, *args: str, values: dict | None = None, tmp: Path | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [helm, *args]
    if values is not None:
        path = (tmp or Path("/tmp")) / f"values-{os.getpid()}-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        path.write_text(yaml.safe_dump(values))
        cmd += ["--values", str(path)]
    # No kubeconfig: lint and template must never reach a cluster.
    env = {**os.environ, "KUBECONFIG": "/dev/null", "HELM_CACHE_HOME": "/tmp/helm-cache",
           "HELM_CONFIG_HOME": "/tmp/helm-config", "HELM_DATA_HOME": "/tmp/helm-data"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def render(helm: str, values: dict | None = None, *, namespace: str = "qlora-system", release: str = "qft",
           tmp: Path | None = None, extra: tuple[str, ...] = ()) -> list[dict]:
    out = run_helm(helm, "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION,
                   *extra, values=values, tmp=tmp).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    """The objects of a kind; Roles and RoleBindings are those for the runs (the leader Lease's are apart)."""
    return [d for d in docs if d["kind"] == kind and not is_leader_rbac(d)]


def is_leader_rbac(doc: dict) -> bool:
    return doc["kind"] in ("Role", "RoleBinding") and doc["metadata"]["name"].endswith("-leader")


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def default_docs(helm):
    return render(helm)


@pytest.fixture(scope="module")
def custom_docs(helm, tmp_path_factory):
    return render(helm, NON_DEFAULT, namespace="ml-platform", release="prod", tmp=tmp_path_factory.mktemp("v"))


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(docs: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(docs)["env"]}


# ---------------------------------------------------------------------------------------------- lint

@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["default", "non-default"])
def test_helm_lint_strict(helm, values, tmp_path):
    proc = run_helm(helm, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, values=values, tmp=tmp_path)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_chart_crd_is_the_generated_crd():
    generated = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    packaged = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert generated == packaged == ["qlorafinetunes.qlora.io.yaml"]
    assert (CHART / "crds" / generated[0]).read_bytes() == (REPO / "crds" / generated[0]).read_bytes(), (
        "charts/qlora-operator/crds/ differs from crds/: run `make crds` "
        "(or cp crds/qlorafinetunes.qlora.io.yaml charts/qlora-operator/crds/)")


def test_crd_is_installed_by_helm_and_kept_out_of_templates(helm, default_docs):
    assert not by_kind(default_docs, "CustomResourceDefinition"), "the CRD belongs in crds/, not templates/"
    with_crds = render(helm, extra=("--include-crds",))
    (crd,) = by_kind(with_crds, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "qlorafinetunes.qlora.io"


def test_chart_versions_follow_the_project():
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["trainer"]["image"].endswith(":" + version)


# --------------------------------------------------------------------------------------- what renders

def test_default_renders_the_operator_and_nothing_optional(default_docs):
    kinds = sorted(d["kind"] for d in default_docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Lease", "Role", "RoleBinding", "Service",
                     "ServiceAccount"]
    for doc in default_docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "qlora-system"
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "qft"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_non_default_renders_every_optional_object(custom_docs):
    kinds = sorted(d["kind"] for d in custom_docs)
    assert kinds == sorted(["Role", "RoleBinding"] * 3 + ["ConfigMap", "Deployment", "Lease", "PodMonitor",
                                                          "PrometheusRule", "Service", "ServiceAccount",
                                                          "ServiceMonitor"])
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert one(custom_docs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_deployment_is_one_recreated_replica_under_the_service_account(default_docs):
    deployment = one(default_docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == one(default_docs, "ServiceAccount")["metadata"]["name"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert container(default_docs)["image"] == "ghcr.io/qlora-operator/qlora-operator:0.1.0"


@pytest.mark.parametrize("docs_name", ["default_docs", "custom_docs"])
def test_restricted_security_context(docs_name, request):
    docs = request.getfixturevalue(docs_name)
    pod_spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec["securityContext"]["runAsUser"] > 0
    assert RESTRICTED_CONTAINER.items() <= container(docs)["securityContext"].items()
    # A read-only root still needs somewhere to write temporary files.
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("docs_name,port", [("default_docs", 8081), ("custom_docs", 9101)])
def test_liveness_probe_asks_the_operators_health_endpoint(docs_name, port, request):
    docs = request.getfixturevalue(docs_name)
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for kind in ("livenessProbe", "readinessProbe"):
        probe = c[kind]["httpGet"]
        assert probe["path"] == "/healthz"
        assert ports[probe["port"]] == port == int(env_of(docs)["QLORA_HEALTH_PORT"])


def test_resources_from_values(default_docs, custom_docs):
    assert container(default_docs)["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                                    "limits": {"memory": "512Mi"}}
    assert container(custom_docs)["resources"] == NON_DEFAULT["resources"]


def test_non_default_pod_settings(custom_docs):
    pod_spec = one(custom_docs, "Deployment")["spec"]["template"]["spec"]
    assert container(custom_docs)["image"] == "registry.example.com/ml/qlora-operator:1.2.3"
    assert container(custom_docs)["imagePullPolicy"] == "Always"
    assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod_spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod_spec["priorityClassName"] == "system-cluster-critical"
    assert pod_spec["serviceAccountName"] == "trainer-bot"
    sa = one(custom_docs, "ServiceAccount")
    assert sa["metadata"]["name"] == "trainer-bot"
    assert sa["metadata"]["annotations"] == {"iam.example.com/role": "qlora"}
    assert env_of(custom_docs)["HTTPS_PROXY"] == "http://proxy:3128"


# ----------------------------------------------------------------------------- settings of the operator

def test_default_environment_gives_the_operators_defaults(default_docs):
    from qlora_operator.settings import Settings, load_settings

    # The one setting the chart adds: the Lease of its release, so that one operator acts at a time.
    lease = one(default_docs, "Lease")["metadata"]
    assert load_settings([], env=env_of(default_docs)) == Settings(
        leader_lease=f"{lease['namespace']}/{lease['name']}")


def test_the_operator_may_read_and_renew_its_lease_and_nothing_else_there(default_docs, helm, tmp_path):
    lease = one(default_docs, "Lease")
    (role,) = [d for d in default_docs if d["kind"] == "Role" and is_leader_rbac(d)]
    (binding,) = [d for d in default_docs if d["kind"] == "RoleBinding" and is_leader_rbac(d)]
    assert role["metadata"]["namespace"] == lease["metadata"]["namespace"] == "qlora-system"
    assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                              "resourceNames": [lease["metadata"]["name"]], "verbs": ["get", "patch"]}]
    sa = one(default_docs, "ServiceAccount")["metadata"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    docs = render(helm, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"}},
                  tmp=tmp_path)
    assert [d["kind"] for d in docs if d["kind"] in ("Lease", "Role", "RoleBinding")] == ["Lease"]


def test_values_reach_the_operator_as_settings(custom_docs):
    from qlora_operator.settings import load_settings

    settings = load_settings([], env=env_of(custom_docs))
    assert settings.watch_namespaces == ("team-a", "team-b")
    assert settings.trainer_image == "registry.example.com/ml/qlora-trainer:9.9.9"
    assert settings.default_base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert settings.prometheus_url == "http://prometheus-operated.monitoring:9090"
    assert settings.scrape_interval == 30
    assert settings.status_min_interval == 2.5
    assert (settings.metrics_port, settings.health_port) == (9100, 9101)
    assert settings.log_level == "DEBUG"


# ------------------------------------------------------------------------------------------------ RBAC

def rules_of(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.mark.parametrize("docs_name", ["default_docs", "custom_docs"])
def test_rbac_has_no_wildcards(docs_name, request):
    for role in by_kind(request.getfixturevalue(docs_name), "ClusterRole") + by_kind(
            request.getfixturevalue(docs_name), "Role"):
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"{role['metadata']['name']}: wildcard in {key}"
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])


def test_cluster_wide_by_default(default_docs):
    role, binding = one(default_docs, "ClusterRole"), one(default_docs, "ClusterRoleBinding")
    sa = one(default_docs, "ServiceAccount")["metadata"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    assert not by_kind(default_docs, "Role")


def test_namespaced_when_watch_namespaces_is_set(default_docs, custom_docs):
    assert not by_kind(custom_docs, "ClusterRole") and not by_kind(custom_docs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in by_kind(custom_docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(custom_docs, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for ns, binding in bindings.items():
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == roles[ns]["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trainer-bot", "namespace": "ml-platform"}]
        # The same permissions as cluster-wide, confined to the namespace.
        assert rules_of(roles[ns]) == rules_of(one(default_docs, "ClusterRole"))


def test_the_operator_may_not_read_secrets(default_docs):
    # Reading them would let whoever may create a QLoRAFinetune probe every Secret the operator can see; a
    # missing Secret is reported from the kubelet's CreateContainerConfigError instead.
    assert not [rule for rule in rules_of(one(default_docs, "ClusterRole")) if rule[1] == "secrets"]


def test_rbac_create_false_renders_no_rbac(helm, tmp_path):
    docs = render(helm, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"}},
                  tmp=tmp_path)
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"} & {
        d["kind"] for d in docs}
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


# --------------------------------------------------------------------------------- Service & monitors

def test_metrics_service_selects_the_operator_pod(default_docs):
    service, deployment = one(default_docs, "Service"), one(default_docs, "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container(default_docs)["ports"]}
    assert port["targetPort"] == "metrics" and ports["metrics"] == int(env_of(default_docs)["QLORA_METRICS_PORT"])


def test_service_monitor_scrapes_the_metrics_service(custom_docs):
    monitor, service = one(custom_docs, "ServiceMonitor"), one(custom_docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-platform"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["interval"] == "15s"


def trainer_pods(nodes: int) -> list[dict]:
    """Pod templates as the operator builds them for a run of `nodes` pods."""
    from qlora_operator import builders
    from qlora_operator.api import QLoRAFinetuneSpec
    from qlora_operator.settings import Settings

    spec = QLoRAFinetuneSpec.model_validate({
        "dataset": {"configMap": {"name": "qa", "key": "data.jsonl"}},
        "output": {"pvc": {"claimName": "adapters", "path": "run"}},
        "resources": {"nodes": nodes},
    })
    owner = builders.Owner(name="support-bot", namespace="team-a", uid="0b7a4d1b-0000-4000-8000-000000000001")
    job = builders.build_job(owner, spec, Settings())
    return [job["spec"]["template"]]


def selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def relabel(rules: list[dict], meta: dict[str, str]) -> dict[str, str] | None:
    """Prometheus relabelling (replace with the default regex and keep/drop) of a target's labels."""
    labels = dict(meta)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("sourceLabels", []))
        regex = re.compile(rule.get("regex", "(.*)"))
        action = rule.get("action", "replace")
        if action == "drop" and regex.fullmatch(value):
            return None
        if action == "keep" and not regex.fullmatch(value):
            return None
        if action == "replace":
            match = regex.fullmatch(value)
            if match:
                labels[rule["targetLabel"]] = match.expand(rule.get("replacement", "$1").replace("$", "\\"))
    return labels


def pod_meta(template: dict, index: int | None = None) -> dict[str, str]:
    labels = dict(template["metadata"]["labels"])
    if index is not None:  # the Job controller labels each pod of an Indexed Job with its index
        labels["batch.kubernetes.io/job-completion-index"] = str(index)
    meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v for k, v in labels.items()}
    meta |= {"__meta_kubernetes_namespace": "team-a", "__meta_kubernetes_pod_name": "support-bot-x7k2p"}
    return meta


def test_pod_monitor_scrapes_the_trainer_pods_the_operator_builds(custom_docs):
    monitor = one(custom_docs, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (template,) = trainer_pods(nodes=1)
    assert selects(monitor["spec"]["selector"], template["metadata"]["labels"])
    (trainer,) = template["spec"]["containers"]
    from qlora_trainer.contract import METRICS_PATH, METRICS_PORT

    assert {"name": endpoint["port"], "containerPort": METRICS_PORT}.items() <= {
        k: v for p in trainer["ports"] if p["name"] == endpoint["port"] for k, v in p.items()}.items()
    assert endpoint["path"] == METRICS_PATH
    labels = relabel(endpoint["relabelings"], pod_meta(template))
    # The labels the dashboard and alerts group by, and the ones the operator's Prometheus mode selects on.
    from qlora_operator.trainer_metrics import NAMESPACE_LABEL, POD_LABEL

    assert labels["finetune"] == "support-bot"
    assert labels[NAMESPACE_LABEL] == "team-a" and labels[POD_LABEL] == "support-bot-x7k2p"


def test_pod_monitor_scrapes_only_rank_zero_of_a_multi_node_run(custom_docs):
    (endpoint,) = one(custom_docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    (template,) = trainer_pods(nodes=2)
    assert relabel(endpoint["relabelings"], pod_meta(template, index=0)) is not None
    assert relabel(endpoint["relabelings"], pod_meta(template, index=1)) is None


def test_pod_monitor_watches_all_namespaces_by_default(helm, tmp_path):
    monitor = one(render(helm, {"podMonitor": {"enabled": True}}, tmp=tmp_path), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


# --------------------------------------------------------------------------------- alerts & dashboard

def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool not found: `make deps` installs it (apt-get install prometheus)")
    return path


def exported_metric_names() -> set[str]:
    """Every series name the trainer and the operator export."""
    from prometheus_client import CollectorRegistry

    from qlora_operator.opmetrics import OperatorMetrics
    from qlora_trainer.contract import Metric

    names = {m.full for m in Metric} | {Metric.TOKENS_TOTAL.full + "_total"}
    registry = CollectorRegistry()
    OperatorMetrics(lambda: {}, registry=registry)
    for family in registry.collect():
        # Labelled families have no samples before their first use: name their series from the type.
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(qlora_[a-z_]+)\b", expr)) - {"qlora_trainer_phase_label"}


def test_alert_rules_pass_promtool_and_use_exported_metrics(custom_docs, tmp_path):
    rule = one(custom_docs, "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"QLoRAFinetuneFailed", "QLoRATrainerFailed", "QLoRAFinetuneStalled", "QLoRAOperatorDown"} == set(alerts)
    known = exported_metric_names()
    for name, alert in alerts.items():
        assert metric_names_in(alert["expr"]) <= known, name
    # The operator alert targets this release's metrics Service.
    assert 'job="prod-qlora-operator-metrics"' in alerts["QLoRAOperatorDown"]["expr"]


def test_alerts_fire_on_failure_and_stall_and_not_on_progress(custom_docs, tmp_path):
    rule = one(custom_docs, "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run = 'namespace="team-a", finetune="{}", pod="{}-abc12"'
    phase = 'qlora_trainer_phase{{' + run + ', qlora_trainer_phase="{}"}}'
    step = 'qlora_trainer_step{{' + run + '}}'
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # "moving" trains for 60 minutes, a step a minute.
                {"series": phase.format("moving", "moving", "training"), "values": "1x60"},
                {"series": step.format("moving", "moving"), "values": "0+1x60"},
                # "stuck" trains, moves for 10 minutes, then stays at step 10.
                {"series": phase.format("stuck", "stuck", "training"), "values": "1x60"},
                {"series": step.format("stuck", "stuck"), "values": "0+1x10 10x50"},
                # "young" started 12 minutes ago and has not finished its first step yet.
                {"series": phase.format("young", "young", "training"), "values": "_x48 1x12"},
                {"series": step.format("young", "young"), "values": "_x48 0x12"},
                # "broken" fails at minute 30 and its pod goes away.
                {"series": phase.format("broken", "broken", "failed"), "values": "0x29 1x1 stale"},
                # The operator's count of failed runs goes from 0 to 1 at minute 30.
                {"series": 'qlora_operator_finetunes{job="prod-qlora-operator-metrics", namespace="ml-platform", '
                           'phase="Failed"}', "values": "0x29 1x30"},
                {"series": 'up{job="prod-qlora-operator-metrics", namespace="ml-platform"}', "values": "1x30 0x30"},
            ],
            "alert_rule_test": [
                # Stalled: stuck since minute 10; stalledFor is 20m, plus the rule's 5m.
                {"eval_time": "36m", "alertname": "QLoRAFinetuneStalled", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "team-a", "finetune": "stuck"},
                    "exp_annotations": _annotations(rule, "QLoRAFinetuneStalled",
                                                    {"namespace": "team-a", "finetune": "stuck"})}]},
                {"eval_time": "20m", "alertname": "QLoRAFinetuneStalled", "exp_alerts": []},
                {"eval_time": "35m", "alertname": "QLoRAFinetuneFailed", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "phase": "Failed", "job": "prod-qlora-operator-metrics",
                                   "namespace": "ml-platform"},
                    "exp_annotations": _annotations(rule, "QLoRAFinetuneFailed", {}, value="1")}]},
                {"eval_time": "29m", "alertname": "QLoRAFinetuneFailed", "exp_alerts": []},
                {"eval_time": "50m", "alertname": "QLoRAFinetuneFailed", "exp_alerts": []},
                {"eval_time": "35m", "alertname": "QLoRATrainerFailed", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "team-a", "finetune": "broken"},
                    "exp_annotations": _annotations(rule, "QLoRATrainerFailed",
                                                    {"namespace": "team-a", "finetune": "broken"})}]},
                {"eval_time": "29m", "alertname": "QLoRATrainerFailed", "exp_alerts": []},
                {"eval_time": "45m", "alertname": "QLoRATrainerFailed", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "QLoRAOperatorDown", "exp_alerts": []},
                {"eval_time": "50m", "alertname": "QLoRAOperatorDown", "exp_alerts": [{
                    "exp_labels": {"severity": "warning"},
                    "exp_annotations": _annotations(rule, "QLoRAOperatorDown", {})}]},
            ],
        }],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run([promtool(), "test", "rules", "tests.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _annotations(rule: dict, alert: str, labels: dict[str, str], value: str = "") -> dict[str, str]:
    """The alert's annotations with its label templates filled in, as promtool expects them."""
    (found,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == alert]
    out = {}
    for key, text in found["annotations"].items():
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        out[key] = text.replace("{{ $value }}", value)
    return out


def dashboard_of(docs: list[dict]) -> dict:
    (config_map,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    (text,) = config_map["data"].values()
    return json.loads(text)


def test_dashboard_configmap_is_picked_up_by_the_grafana_sidecar(custom_docs):
    (config_map,) = by_kind(custom_docs, "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ML"}


def test_dashboard_shows_each_run_and_the_operator(custom_docs, tmp_path):
    dashboard = dashboard_of(custom_docs)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in panels}
    used = {name for texts in exprs.values() for e in texts for name in metric_names_in(e)}
    # Loss, progress, tokens per second and GPU memory of each run; the operator's health.
    for needed in ("qlora_trainer_loss", "qlora_trainer_step", "qlora_trainer_total_steps",
                   "qlora_trainer_tokens_per_second", "qlora_trainer_gpu_memory_peak_bytes",
                   "qlora_operator_finetunes", "qlora_operator_reconcile_errors_total"):
        assert needed in used, needed
    assert used <= exported_metric_names()
    for title, texts in exprs.items():
        if any(name.startswith("qlora_trainer_") for e in texts for name in metric_names_in(e)):
            assert all('finetune=~"$finetune"' in e for e in texts), f"{title}: not filtered by run"
        if any(name.startswith("qlora_operator_") for e in texts for name in metric_names_in(e)):
            assert all('job="prod-qlora-operator-metrics", namespace="ml-platform"' in e for e in texts), title
    # Every query is valid PromQL (checked by promtool as recording rules, the dashboard variables filled in).
    rules = [{"record": f"dashboard:panel_{n}", "expr": e.replace("$namespace", ".*").replace("$finetune", ".*")}
             for n, e in enumerate(e for texts in exprs.values() for e in texts)]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(tmp_path / "dashboard.yaml")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "finetune"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------------ values & schema

def test_every_value_has_a_comment():
    """Each value in values.yaml has a `# --` comment above it, or sits inside a block documented as one."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    documented_block: int | None = None  # indent of an enclosing `# --` documented key
    for n, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        if documented_block is not None and indent > documented_block:
            continue
        documented_block = None
        above = lines[n - 1].strip() if n else ""
        comments = []
        k = n - 1
        while k >= 0 and lines[k].strip().startswith("#"):
            comments.append(lines[k].strip())
            k -= 1
        is_leaf = not line.rstrip().endswith(":")
        if any(c.startswith("# --") for c in comments):
            documented_block = indent
        elif is_leaf or not above.startswith("#"):
            missing.append(line.strip())
    assert not missing, f"values without a comment: {missing}"


def test_issue_named_values_exist():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted in ("trainer.image", "defaults.baseModel", "watchNamespaces", "prometheus.url",
                   "metrics.scrapeInterval", "image.repository", "resources", "serviceMonitor.enabled",
                   "podMonitor.enabled", "prometheusRule.enabled", "grafanaDashboard.enabled"):
        node = values
        for part in dotted.split("."):
            assert part in node, dotted
            node = node[part]


def test_schema_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value, node, where):
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        if isinstance(value, dict) and "properties" in node:
            for key, sub in value.items():
                assert key in node["properties"], f"{where}{key} is not in values.schema.json"
                walk(sub, node["properties"][key], f"{where}{key}.")

    walk(values, schema, "")
    import jsonschema

    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)


@pytest.mark.parametrize("bad,says", [
    ({"image": {"tagg": "1.0"}}, "tagg"),
    ({"metrics": {"scrapeInterval": 0}}, "scrapeInterval"),
    ({"status": {"minInterval": -1}}, "minInterval"),
    ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
    ({"watchNamespaces": "team-a"}, "watchNamespaces"),
    ({"prometheus": {"url": "prometheus:9090"}}, "url"),
    ({"health": {"port": 70000}}, "port"),
    ({"defaults": {"baseModel": ""}}, "baseModel"),
    ({"prometheusRule": {"stalledFor": "half an hour"}}, "stalledFor"),
    ({"logLevel": "LOUD"}, "logLevel"),
    ({"replicas": 2}, "replicas"),
])
def test_schema_refuses_bad_values(helm, bad, says, tmp_path):
    proc = run_helm(helm, "template", "qft", str(CHART), "--kube-version", KUBE_VERSION, values=bad, tmp=tmp_path,
                    check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr and says in proc.stderr


def test_the_example_user_roles_grant_runs_and_nothing_of_the_operators():
    # README, "Who may do what": an editor role into `edit` (the pod-creating role), a viewer into `view`.
    roles = {d["metadata"]["name"]: d for d in yaml.safe_load_all(
        (Path(__file__).resolve().parents[2] / "examples" / "rbac" / "qlorafinetune-roles.yaml").read_text())}
    editor, viewer = roles["qlorafinetune-editor"], roles["qlorafinetune-viewer"]
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in editor["metadata"]["labels"]
    assert viewer["metadata"]["labels"] == {"rbac.authorization.k8s.io/aggregate-to-view": "true"}
    writes = {"create", "patch", "update", "delete"}
    granted = {(g, r, v) for rule in editor["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert ("qlora.io", "qlorafinetunes", "create") in granted
    # Only runs are written; Secrets, ConfigMaps and the status are never granted.
    assert {(g, r) for g, r, v in granted if v in writes} == {("qlora.io", "qlorafinetunes")}
    assert not {r for _, r, _ in granted} & {"secrets", "configmaps", "qlorafinetunes/status"}
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in viewer["rules"])


def test_the_admission_policy_is_optional_and_bound_to_the_watched_namespaces(helm, default_docs, tmp_path):
    assert not by_kind(default_docs, "ValidatingAdmissionPolicy")
    docs = render(helm, {"admissionPolicy": {"enabled": True, "allowedImagePrefixes": ["ghcr.io/acme/"]},
                         "watchNamespaces": ["team-a"]}, tmp=tmp_path)
    policy, binding = one(docs, "ValidatingAdmissionPolicy"), one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"] and policy["spec"]["failurePolicy"] == "Fail"
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    for checked in ("resource('pods')", "check('create')", "resource('serviceaccounts')", "check('impersonate')",
                    "resource('secrets')", "check('get')", '["ghcr.io/acme/"]'):
        assert checked in expressions
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a"]
