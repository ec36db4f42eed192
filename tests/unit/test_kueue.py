"""hack/localcluster/kueue.py: what it makes of upstream's manifests, without a cluster."""

from __future__ import annotations

import pytest

from hack.localcluster import kueue

CA = "Q0E="


def hook(name: str, group: str, resource: str) -> dict:
    return {"name": name, "clientConfig": {"service": {"name": "webhook-service", "namespace": "system",
                                                       "path": f"/mutate-{resource}"}},
            "rules": [{"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": [resource]}]}


@pytest.mark.parametrize("group, resource, served", [
    ("kueue.x-k8s.io", "workloads", True),
    ("batch", "jobs", True),
    ("", "pods", False),  # the pod integration is off: no pod waits on Kueue
    ("apps", "deployments", False),
    ("kubeflow.org", "pytorchjobs", False),
])
def test_only_kueues_api_and_enabled_integrations_are_registered(group, resource, served):
    assert kueue.served(hook("h", group, resource)) is served


def test_webhooks_are_reached_by_url_with_the_cluster_ca_and_named_as_kustomize_names_them():
    manifest = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "mutating-webhook-configuration"},
                "webhooks": [hook("mjob.kb.io", "batch", "jobs"), hook("mpod.kb.io", "", "pods")]}
    (out,) = kueue.webhook_configurations([manifest], 9443, CA)
    assert out["metadata"]["name"] == "kueue-mutating-webhook-configuration"
    assert [h["name"] for h in out["webhooks"]] == ["mjob.kb.io"]
    assert out["webhooks"][0]["clientConfig"] == {"url": "https://127.0.0.1:9443/mutate-jobs", "caBundle": CA}


@pytest.mark.parametrize("plural, converted", [("workloads", True), ("localqueues", True),
                                               ("resourceflavors", False), ("topologies", False)])
def test_conversion_webhooks_as_upstreams_crd_patches(plural, converted):
    crd = {"kind": "CustomResourceDefinition", "spec": {"names": {"plural": plural}, "versions": []}}
    conversion = kueue.with_conversion_webhook(crd, 9443, CA)["spec"].get("conversion")
    if converted:
        assert conversion["strategy"] == "Webhook"
        assert conversion["webhook"]["clientConfig"]["url"] == "https://127.0.0.1:9443/convert"
    else:
        assert conversion is None


def test_every_role_is_bound_to_the_managers_certificate_user():
    roles = [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
              "metadata": {"name": "manager-role"}, "rules": []},
             {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
              "metadata": {"name": "manager-secrets-role", "namespace": "system"}, "rules": []}]
    objs = kueue.rbac(roles)
    assert [(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objs] == [
        ("ClusterRole", "kueue-manager-role", None),
        ("ClusterRoleBinding", "kueue-manager-rolebinding", None),
        ("Role", "kueue-manager-secrets-role", "kueue-system"),
        ("RoleBinding", "kueue-manager-secrets-rolebinding", "kueue-system")]
    assert objs[1]["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                    "name": "kueue-controller-manager"}]
    assert objs[3]["roleRef"]["kind"] == "Role"


def test_config_manages_only_jobs_that_name_a_queue_on_loopback_ports(tmp_path):
    cfg = kueue.config({"webhook": 1, "health": 2, "metrics": 3}, tmp_path)
    assert cfg["manageJobsWithoutQueueName"] is False and cfg["integrations"] == {"frameworks": ["batch/job"]}
    assert cfg["internalCertManagement"] == {"enable": False}
    assert cfg["webhook"] == {"host": "127.0.0.1", "port": 1, "certDir": str(tmp_path)}
    assert cfg["health"]["healthProbeBindAddress"] == "127.0.0.1:2"
    assert cfg["metrics"]["bindAddress"] == "127.0.0.1:3"


def test_default_queues_hold_the_flavor_and_a_queue_with_the_nodes_quota():
    flavor, cq = kueue.default_queues_manifest("8", "32Gi", 2)["items"]
    assert flavor["kind"] == "ResourceFlavor" and flavor["metadata"]["name"] == "default"
    (group,) = cq["spec"]["resourceGroups"]
    assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"]
    assert group["flavors"] == [{"name": "default", "resources": [
        {"name": "cpu", "nominalQuota": "8"}, {"name": "memory", "nominalQuota": "32Gi"},
        {"name": "nvidia.com/gpu", "nominalQuota": "2"}]}]
    assert cq["spec"]["namespaceSelector"] == {}  # every namespace
    assert kueue.cluster_queue("q", "1", "1Gi", 0, namespaces=["a"])["spec"]["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["a"]}]}


def test_the_cache_key_changes_with_the_go_version_and_the_flags():
    keys = {kueue.build_key("go1.26.0", "-s"), kueue.build_key("go1.26.1", "-s"), kueue.build_key("go1.26.0", "-w")}
    assert len(keys) == 3
    assert "GitVersion=v0.17.0" in kueue.ldflags("2026-03-31T10:20:15Z")
