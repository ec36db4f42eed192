"""Cluster DNS on the real node: CoreDNS with its kubernetes plugin, run as a process on loopback.

Pods resolve `<service>.<namespace>.svc.cluster.local` (a headless Service gives its pods' addresses, which is
what the multi-node rendezvous needs) and `<hostname>.<subdomain>.<namespace>.svc...` of an Indexed Job's pods.
The kubelet tells pods to ask DNS_SERVICE_IP; a DNAT on the bridge takes those queries to CoreDNS on
127.0.0.1, as it does the API server's. Only the cluster's zones are answered: there is no `forward`, so no
name is ever looked up off the machine. CoreDNS signs in with a certificate of its own (user `coredns`),
bound to the rules of the `system:coredns` ClusterRole that kubeadm installs.
"""

from __future__ import annotations

from pathlib import Path

DNS_SERVICE_IP = "198.18.128.10"
USER = "coredns"
CLUSTER_DOMAIN = "cluster.local"


def corefile(port: int, ready_port: int, kubeconfig: Path) -> str:
    return f""".:{port} {{
    bind 127.0.0.1
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig} localcluster
        pods insecure
    }}
    cache 5
}}
"""


def manifests() -> list[dict]:
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": USER},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": USER},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": USER},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]},
    ]


def nat_rules(port: int, chain: str, bridge: str) -> list[list[str]]:
    """Queries to the cluster DNS address, over UDP and TCP, to CoreDNS on loopback."""
    return [["-A", chain, "-i", bridge, "-d", f"{DNS_SERVICE_IP}/32", "-p", proto, "--dport", "53",
             "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}"] for proto in ("udp", "tcp")]


def argv(binary: Path, corefile_path: Path) -> list[str]:
    return [str(binary), "-conf", str(corefile_path)]
