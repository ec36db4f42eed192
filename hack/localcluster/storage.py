"""Volumes on the real node: Rancher's local-path-provisioner (the default StorageClass of kind), run as a process.

A claim of the `local-path` StorageClass (the default, Immediate binding) gets a folder under the cluster's
`node/volumes`, made by a helper pod (busybox) with mode 0777 so a non-root trainer can write it, and a hostPath
PersistentVolume; deleting the claim deletes the folder. The node's folder is configured as a shared file
system (one node sees it all), which is what lets a claim bind before any pod uses it, as the tests and the
demo need to fill the model volume first.

The provisioner signs in with a client certificate of its own (user `local-path-provisioner`), bound to
upstream's ClusterRole and namespaced Role, nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

NAMESPACE = "local-path-storage"
CONFIG_MAP = "local-path-config"
HELPER_SERVICE_ACCOUNT = "local-path-provisioner-service-account"
PROVISIONER = "rancher.io/local-path"
USER = "local-path-provisioner"
STORAGE_CLASS = "local-path"


def volumes_dir(cluster_dir: Path) -> Path:
    return cluster_dir / "node" / "volumes"


def manifests(cluster_dir: Path, helper_image: str) -> list[dict]:
    helper_pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "helper-pod"},
        "spec": {"priorityClassName": "system-node-critical",
                 "tolerations": [{"key": "node.kubernetes.io/disk-pressure", "operator": "Exists",
                                  "effect": "NoSchedule"}],
                 "containers": [{"name": "helper-pod", "image": helper_image, "imagePullPolicy": "IfNotPresent"}]},
    }
    cluster_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": USER},
        "rules": [
            {"apiGroups": [""], "resources": ["nodes", "persistentvolumeclaims", "configmaps", "pods", "pods/log"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["persistentvolumes"],
             "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"], "verbs": ["get", "list", "watch"]},
        ]}
    role = {  # the helper pods it starts and removes, in its own namespace
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": USER, "namespace": NAMESPACE},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "patch",
                                                                      "update", "delete"]}]}
    subject = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": HELPER_SERVICE_ACCOUNT, "namespace": NAMESPACE}},
        cluster_role, role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": USER},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": USER},
         "subjects": subject},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": USER, "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": USER}, "subjects": subject},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIG_MAP, "namespace": NAMESPACE},
         "data": {
             "config.json": json.dumps({"sharedFileSystemPath": str(volumes_dir(cluster_dir))}),
             "setup": '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
             "teardown": '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n',
             "helperPod.yaml": json.dumps(helper_pod)}},
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
         "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"},
    ]


def argv(binary: Path, kubeconfig: Path, helper_image: str) -> list[str]:
    return [str(binary), "start", "--kubeconfig", str(kubeconfig), "--namespace", NAMESPACE,
            "--configmap-name", CONFIG_MAP, "--service-account-name", HELPER_SERVICE_ACCOUNT,
            "--helper-image", helper_image, "--provisioner-name", PROVISIONER]
