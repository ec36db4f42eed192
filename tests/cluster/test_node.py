"""The real node (issue 16): a kubelet, containerd and runc enforce what a cluster enforces, here.

These run on the session's cluster (tests/conftest.py), whose node is the real one; `localcluster down`, at the
session's end, checks that the node left nothing on the machine (no mount, cgroup, link, rule or CNI result).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, LocalCluster

sys.path.insert(0, str(REPO / "hack" / "localcluster"))
import node  # noqa: E402

pytestmark = pytest.mark.cluster

BUSYBOX = node.BUSYBOX_IMAGE


@pytest.fixture
def real(cluster) -> LocalCluster:
    if cluster.external:
        pytest.skip("checks the local cluster's own node")
    return cluster


@pytest.fixture
def ns(namespace) -> str:
    return namespace


def busybox_pod(name: str, script: str, restart: str = "Never", **container) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 2,
                     "containers": [{"name": "main", "image": BUSYBOX, "command": ["sh", "-c", script],
                                     **container}]}}


def create(real, ns, *pods: dict) -> None:
    real.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(pods)}),
                 namespace=ns)


def state_of(real, ns, name) -> dict:
    pod = real.kubectl_json("get", "pod", name, namespace=ns)
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return statuses[0].get("state", {})


def wait_terminated(real, ns, name, timeout=90) -> dict:
    return real.wait_until(lambda: state_of(real, ns, name).get("terminated"), timeout, f"pod {name} to end")


def test_node_runs_the_kubelet_and_containerd_of_the_pinned_releases(real):
    wide = real.kubectl("get", "node", "-o", "wide").stdout
    assert " Ready " in wide and "v1.37.2" in wide and "containerd://2.4.2" in wide, wide
    info = real.kubectl_json("get", "node", node.NODE_NAME)["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.37.2" and info["containerRuntimeVersion"] == "containerd://2.4.2"
    addresses = {a["type"]: a["address"] for a in real.kubectl_json("get", "node", node.NODE_NAME)["status"]["addresses"]}
    assert addresses["InternalIP"] == node.NODE_IP


def test_gpus_are_counted_by_the_scheduler_and_allocated_by_the_device_plugin(real, ns):
    one = busybox_pod("one-gpu", "echo $LOCALCLUSTER_FAKE_GPUS", resources={"limits": {"nvidia.com/gpu": "1"}})
    three = busybox_pod("three-gpus", "true", resources={"limits": {"nvidia.com/gpu": "3"}})
    create(real, ns, one, three)
    assert wait_terminated(real, ns, "one-gpu")["exitCode"] == 0
    assert real.kubectl("logs", "one-gpu", namespace=ns).stdout.strip() in ("fake-gpu-0", "fake-gpu-1")

    def unschedulable():
        conds = real.kubectl_json("get", "pod", "three-gpus", namespace=ns).get("status", {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"), None)
    cond = real.wait_until(unschedulable, 60, "the scheduler to refuse three GPUs")
    assert "nvidia.com/gpu" in cond["message"], cond


def test_logs_and_exec_go_through_the_kubelet(real, ns):
    create(real, ns, busybox_pod("talk", "echo started; exec sleep 300"))
    real.wait_until(lambda: state_of(real, ns, "talk").get("running"), 90, "pod talk to run")
    real.wait_until(lambda: "started" in real.kubectl("logs", "talk", namespace=ns).stdout, 30, "the log line")
    out = real.kubectl("exec", "talk", "--", "sh", "-c", "cat /etc/hostname; id -u", namespace=ns).stdout.split()
    assert out == ["talk", "0"]


def test_a_memory_limit_is_enforced_by_the_kernel(real, ns):
    # PID 1 itself allocates: the OOM killer ends the container's main process, so the kubelet sees exit 137
    grow = busybox_pod("grow", "exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
                       resources={"limits": {"memory": "30Mi"}})
    create(real, ns, grow)
    ended = wait_terminated(real, ns, "grow")
    assert (ended["reason"], ended["exitCode"]) == ("OOMKilled", 137), ended


def test_a_read_only_root_filesystem_and_a_non_root_user_are_enforced(real, ns):
    locked = busybox_pod(
        "locked", "id -u >&2; touch /written", terminationMessagePolicy="FallbackToLogsOnError",
        securityContext={"readOnlyRootFilesystem": True, "runAsUser": 65532, "runAsNonRoot": True,
                         "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                         "seccompProfile": {"type": "RuntimeDefault"}})
    create(real, ns, locked)
    ended = wait_terminated(real, ns, "locked")
    assert ended["exitCode"] == 1 and "65532" in ended["message"], ended
    assert "Read-only file system" in ended["message"], ended


def test_the_termination_message_is_the_file_the_container_wrote(real, ns):
    create(real, ns, busybox_pod("says", "echo '{\"reason\": \"done\"}' > /dev/termination-log; exit 3"))
    ended = wait_terminated(real, ns, "says")
    assert ended["exitCode"] == 3 and json.loads(ended["message"]) == {"reason": "done"}, ended


def test_an_image_that_is_not_on_the_node_fails_to_pull_without_leaving_the_machine(real, ns):
    create(real, ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "absent"},
                      "spec": {"containers": [{"name": "main", "image": "example.org/absent:1"}]}})

    def waiting_reason():
        return state_of(real, ns, "absent").get("waiting", {}).get("reason") == "ImagePullBackOff"
    real.wait_until(waiting_reason, 90, "ImagePullBackOff")
    events = real.kubectl_json("get", "events", namespace=ns)["items"]
    failed = [e["message"] for e in events if e.get("reason") == "Failed" and "ErrImagePull" not in e["message"]]
    assert failed and all("127.0.0.1:1" in m for m in failed if "failed to pull" in m.lower()), failed


def test_pods_get_addresses_in_the_pod_range_and_the_host_and_pods_reach_them(real, ns):
    serve = "mkdir -p /tmp/www && echo hello-from-$(hostname) > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    create(real, ns, busybox_pod("web", serve))
    real.wait_until(lambda: state_of(real, ns, "web").get("running"), 90, "pod web to run")
    ip = real.kubectl_json("get", "pod", "web", namespace=ns)["status"]["podIP"]
    assert ip.startswith("198.18.0."), ip
    body = real.wait_until(lambda: _get(f"http://{ip}:8080/"), 30, f"the host to reach {ip}")
    assert body.strip() == "hello-from-web"
    create(real, ns, busybox_pod("client", f"wget -q -O- http://{ip}:8080/; ip route"))
    assert wait_terminated(real, ns, "client")["exitCode"] == 0
    out = real.kubectl("logs", "client", namespace=ns).stdout
    assert "hello-from-web" in out
    # nothing routes off the benchmarking range: no default route in a pod
    assert "default" not in out and "198.18.0.0/15" in out, out


def test_pods_reach_the_api_server_at_the_kubernetes_service(real, ns):
    # busybox speaks no TLS the API server accepts; plain HTTP to its port gets Go's TLS server's own answer
    probe = busybox_pod("api", "echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT; "
                               "wget -q -O- http://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/ 2>&1; true")
    create(real, ns, probe)
    assert wait_terminated(real, ns, "api")["exitCode"] == 0
    out = real.kubectl("logs", "api", namespace=ns).stdout
    assert out.startswith(f"{node.API_SERVICE_IP}:443\n") and "400 Bad Request" in out, out


def test_a_claim_is_provisioned_and_a_non_root_pod_writes_to_it(real, ns):
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    writer = busybox_pod("writer", "echo kept > /data/out.txt", securityContext={"runAsUser": 1000})
    writer["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    writer["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    create(real, ns, claim)
    volume = real.wait_until(lambda: real.kubectl_json("get", "pvc", "data", namespace=ns)["spec"].get("volumeName"),
                             60, "the claim to be bound (Immediate binding, before any pod)")
    create(real, ns, writer)
    assert wait_terminated(real, ns, "writer")["exitCode"] == 0
    folder = Path(real.kubectl_json("get", "pv", volume)["spec"]["hostPath"]["path"])
    assert folder.parent == real.dir / "node" / "volumes" and (folder / "out.txt").read_text() == "kept\n"
    real.kubectl("delete", "pod", "writer", "--wait=true", namespace=ns)
    real.kubectl("delete", "pvc", "data", namespace=ns)
    real.wait_until(lambda: not folder.exists(), 60, "the released volume's folder to be removed")


def test_a_headless_service_resolves_to_its_pods_and_nothing_resolves_off_the_machine(real, ns):
    member = busybox_pod("rank-0", "exec sleep 300")
    member["metadata"]["labels"] = {"app": "group"}
    member["spec"].update(hostname="rank-0", subdomain="group")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "group"},
               "spec": {"clusterIP": "None", "selector": {"app": "group"}, "ports": [{"port": 29500}]}}
    create(real, ns, service, member)
    real.wait_until(lambda: state_of(real, ns, "rank-0").get("running"), 90, "pod rank-0 to run")
    ip = real.kubectl_json("get", "pod", "rank-0", namespace=ns)["status"]["podIP"]
    # (busybox nslookup applies no search domain; glibc, which the trainer uses, does)
    names = [f"group.{ns}.svc.cluster.local", f"rank-0.group.{ns}.svc.cluster.local"]
    script = "; ".join(f"nslookup {n} >/tmp/out 2>&1 && grep -q {ip} /tmp/out && echo found {n}" for n in names)
    create(real, ns, busybox_pod("resolver", script + "; nslookup example.org >/dev/null 2>&1 || echo no example.org"))
    assert wait_terminated(real, ns, "resolver")["exitCode"] == 0
    lines = real.kubectl("logs", "resolver", namespace=ns).stdout.splitlines()
    assert lines == [f"found {n}" for n in names] + ["no example.org"], lines


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def test_the_nodes_own_images_are_pinned_against_the_kubelets_image_garbage_collection(real):
    # On a disk that build caches fill, the kubelet removes unused images; the volume helper's busybox (no pod
    # uses it between two claims) must stay, or every later claim waits on an image it cannot pull.
    sys.path.insert(0, str(REPO / "hack" / "localcluster"))
    import localcluster

    listed = node.run(*node.ctr(localcluster.build_node_bins(), node.Layout(real.dir), "images", "ls")).stdout
    (line,) = [row for row in listed.splitlines() if row.startswith(BUSYBOX + " ")]
    assert f"{node.PINNED_LABEL}=pinned" in line, line
