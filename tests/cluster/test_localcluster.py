"""The local cluster: a real control plane built and cached from the pinned release, several at once, a
crashed one restarted, and the controllers and the node doing what a cluster does for the operator's objects.

The pods here run busybox (the node's own image) or the operator image (Python and the Kubernetes client).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import LOCALCLUSTER, REPO, localcluster

sys.path.insert(0, str(REPO / "hack" / "localcluster"))
import images  # noqa: E402
import node  # noqa: E402

pytestmark = pytest.mark.cluster

BUSYBOX = node.BUSYBOX_IMAGE


def pod(name: str, script: str, image: str = BUSYBOX, restart: str = "Never", **spec) -> dict:
    """A pod running `script` with sh (busybox), or with python for another image."""
    shell = ["sh", "-c"] if image == BUSYBOX else ["python", "-c"]
    container = {"name": "main", "image": image, "command": [*shell, script]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart, "containers": [container], **spec}}


def apply(kubectl, *objects: dict) -> None:
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def pod_phase(kubectl, name: str) -> str:
    return kubectl.json("get", "pod", name).get("status", {}).get("phase", "")


def wait_phase(cluster, kubectl, name: str, phases=("Succeeded",), timeout: float = 90) -> dict:
    def done():
        p = kubectl.json("get", "pod", name)
        return p if p.get("status", {}).get("phase") in phases else None
    return cluster.wait_until(done, timeout, f"pod {name} to reach {phases}")


def container_state(p: dict) -> dict:
    statuses = p.get("status", {}).get("containerStatuses") or [{"state": {}}]
    return statuses[0]["state"]


# ------------------------------------------------------------------------------------------ control plane

def test_node_is_ready_with_gpu_capacity(cluster):
    text = cluster.kubectl("get", "nodes").stdout
    assert " Ready " in text, text
    node_ = cluster.kubectl_json("get", "nodes")["items"][0]
    ready = next(c for c in node_["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert int(node_["status"]["capacity"]["nvidia.com/gpu"]) >= 1
    assert int(node_["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
    lease = cluster.kubectl_json("get", "lease", node_["metadata"]["name"], namespace="kube-node-lease")
    assert lease["spec"]["holderIdentity"] == node_["metadata"]["name"]


def test_second_cluster_starts_from_cache_is_idempotent_and_goes_down(cluster, tmp_path):
    if cluster.external:
        pytest.skip("starts local clusters")
    d = tmp_path / "second"
    # the node is one per machine and the session's holds it: a second cluster is a control plane alone
    first = localcluster("up", "--dir", str(d), "--node", "none")
    # the session's cluster built (or found) the binaries; this start compiles nothing
    assert "cached, built nothing" in first.stdout, first.stdout
    try:
        ours = json.loads((d / "state.json").read_text())["ports"]
        theirs = json.loads((cluster.dir / "state.json").read_text())["ports"]
        assert ours["apiserver"] != theirs["apiserver"]  # two clusters at once, on their own ports
        version = subprocess.run([str(d / "bin" / "kubectl"), "--kubeconfig", str(d / "kubeconfig"), "version",
                                  "-o", "json"], capture_output=True, text=True, check=True).stdout
        assert json.loads(version)["serverVersion"]["gitVersion"].startswith("v1.37"), version
        for name in ("kubectl", "helm", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"):
            assert os.access(d / "bin" / name, os.X_OK), name
        helm = subprocess.run([str(d / "bin" / "helm"), "version", "--short"], capture_output=True, text=True)
        assert helm.returncode == 0 and helm.stdout.startswith("v3."), helm.stdout + helm.stderr
        again = localcluster("up", "--dir", str(d), "--node", "none")
        assert "already running" in again.stdout
        status = localcluster("status", "--dir", str(d))
        assert "memory (RSS): control plane" in status.stdout
    finally:
        localcluster("down", "--dir", str(d))
    assert not d.exists()


def test_a_second_real_node_is_refused_with_what_to_do(cluster, tmp_path):
    if cluster.external:
        pytest.skip("starts local clusters")
    out = localcluster("up", "--dir", str(tmp_path / "rival"), "--node", "real", check=False)
    assert out.returncode == 1, out.stdout
    assert f"the node of the local cluster in {cluster.dir} runs on this machine" in out.stdout, out.stdout
    assert " Ready " in cluster.kubectl("get", "nodes").stdout  # the session's node is untouched


def test_busy_port_and_stale_state_are_handled(cluster, tmp_path):
    if cluster.external:
        pytest.skip("starts local clusters")
    d = tmp_path / "third"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = localcluster("up", "--dir", str(d), "--node", "none", "--apiserver-port", str(port)).stdout
        assert f"port {port} asked for kube-apiserver is busy" in out, out
    try:
        state = json.loads((d / "state.json").read_text())
        assert state["ports"]["apiserver"] != port
        # a crash: the API server dies; status says so, and the next `up` cleans up and starts again
        os.killpg(state["pids"]["kube-apiserver"], signal.SIGKILL)
        cluster.wait_until(lambda: localcluster("status", "--dir", str(d), check=False).returncode != 0, 30,
                           "status to notice the dead API server")
        assert "NOT RUNNING" in localcluster("status", "--dir", str(d), check=False).stdout
        out = localcluster("up", "--dir", str(d), "--node", "none").stdout
        assert "stale state" in out and "kube-apiserver" in out, out
        assert "ready=True" in localcluster("status", "--dir", str(d), check=False).stdout
    finally:
        localcluster("down", "--dir", str(d))


def test_foreign_folder_and_missing_toolchain_give_a_message(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    out = localcluster("up", "--dir", str(foreign), check=False)
    assert out.returncode == 1 and "not made by localcluster" in out.stdout
    assert (foreign / "precious.txt").exists()
    env = {**os.environ, "GO": str(tmp_path / "no-go-here"), "QLORA_CACHE": str(tmp_path / "empty-cache")}
    out = subprocess.run([sys.executable, str(LOCALCLUSTER), "build"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "Go toolchain is missing" in out.stderr and "Install Go" in out.stderr, out.stderr


def test_load_names_an_image_it_does_not_know(tmp_path):
    out = localcluster("load", "--dir", str(tmp_path / "any"), "opertor", check=False)
    assert out.returncode == 1
    assert f"no image archive at {Path.cwd() / 'opertor'}; name the project's images (operator, trainer)" in out.stdout


# ------------------------------------------------------------------------------------------ controllers

def test_job_completes_through_the_job_controller_and_logs_are_readable(cluster, kubectl):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "hello"},
           "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
               {"name": "main", "image": BUSYBOX, "command": ["sh", "-c", "echo hello from a job $((6 * 7))"]}]}}}}
    apply(kubectl, job)
    kubectl("wait", "--for=condition=Complete", "job/hello", "--timeout=120s", timeout=130)
    assert "hello from a job 42" in kubectl("logs", "job/hello").stdout
    pods = kubectl.json("get", "pods", "-l", "job-name=hello")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    term = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"


def test_deleting_the_owner_deletes_the_job(cluster, kubectl):
    apply(kubectl, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {}})
    uid = kubectl.json("get", "configmap", "owner")["metadata"]["uid"]
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "owned", "ownerReferences": [
               {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]},
           "spec": {"template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                                          "containers": [{"name": "main", "image": BUSYBOX,
                                                          "command": ["sleep", "300"]}]}}}}
    apply(kubectl, job)
    cluster.wait_until(lambda: kubectl.json("get", "pods", "-l", "job-name=owned")["items"], 60, "the job's pod")
    kubectl("delete", "configmap", "owner")
    cluster.wait_until(lambda: kubectl("get", "job", "owned", check=False).returncode != 0, 90,
                       "the garbage collector to delete the job")
    cluster.wait_until(lambda: not kubectl.json("get", "pods", "-l", "job-name=owned")["items"], 90,
                       "the job's pod to go")


# ------------------------------------------------------------------------------------------ pods on the node

def test_pod_reads_secret_env_and_configmap_file_at_its_mount_path(cluster, kubectl):
    apply(kubectl,
          {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}},
          {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "conf"},
           "data": {"settings.json": '{"lr": 0.001}'}},
          pod("reader", "echo TOKEN=$HF_TOKEN; echo FILE=$(cat /etc/qlora/settings.json); echo NS=$MY_NS IP=$MY_IP",
              container={"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                                 {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                 {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                         "volumeMounts": [{"name": "conf", "mountPath": "/etc/qlora"}]},
              volumes=[{"name": "conf", "configMap": {"name": "conf"}}]))
    p = wait_phase(cluster, kubectl, "reader")
    logs = kubectl("logs", "reader").stdout
    assert "TOKEN=s3cr3t" in logs
    assert 'FILE={"lr": 0.001}' in logs
    assert f"NS={kubectl.namespace} IP={p['status']['podIP']}" in logs
    assert not Path("/etc/qlora").exists()  # the mount point exists only inside the pod


def test_missing_secret_is_a_config_error(cluster, kubectl):
    apply(kubectl, pod("nosecret", "true", container={
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}))
    cluster.wait_until(lambda: container_state(kubectl.json("get", "pod", "nosecret")).get("waiting", {})
                       .get("reason") == "CreateContainerConfigError", 60, "CreateContainerConfigError")
    msg = container_state(kubectl.json("get", "pod", "nosecret"))["waiting"]["message"]
    assert 'secret "absent" not found' in msg


def test_pods_serve_the_same_port_on_their_own_ips(cluster, kubectl):
    serve = "mkdir -p /tmp/www && echo $NAME > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    env = [{"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    apply(kubectl, *(pod(n, serve, terminationGracePeriodSeconds=2,
                         container={"env": env, "ports": [{"containerPort": 8080}]}) for n in ("web-a", "web-b")))
    ips = {}
    for name in ("web-a", "web-b"):
        p = wait_phase(cluster, kubectl, name, phases=("Running",))
        ips[name] = p["status"]["podIP"]
        assert p["status"]["podIPs"] == [{"ip": ips[name]}]
    assert ips["web-a"] != ips["web-b"]

    def answer(ip):
        try:
            return urllib.request.urlopen(f"http://{ip}:8080/", timeout=2).read().decode().strip()
        except OSError:
            return None
    for name, ip in ips.items():
        assert cluster.wait_until(lambda: answer(ip), 30, f"{name} to answer on {ip}:8080") == name


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(cluster, kubectl, tmp_path):
    if cluster.external:
        pytest.skip("reads a hostPath folder of the local node")
    marks = tmp_path / "marks"
    marks.mkdir()
    # sleep in the background: a shell runs its trap only between commands
    polite = "trap 'echo SIGTERM > /marks/polite; exit 0' TERM; echo ready; while true; do sleep 1 & wait; done"
    stubborn = "trap 'echo ignored SIGTERM > /marks/stubborn' TERM; echo ready; while true; do sleep 1 & wait; done"
    mount = {"volumeMounts": [{"name": "marks", "mountPath": "/marks"}]}
    vols = [{"name": "marks", "hostPath": {"path": str(marks)}}]
    apply(kubectl, pod("polite", polite, container=mount, volumes=vols),
          pod("stubborn", stubborn, container=mount, volumes=vols, terminationGracePeriodSeconds=2))
    for name in ("polite", "stubborn"):
        wait_phase(cluster, kubectl, name, phases=("Running",))
        cluster.wait_until(lambda: "ready" in kubectl("logs", name).stdout, 30, f"{name} to print ready")
    kubectl("delete", "pod", "polite", "stubborn", timeout=90)  # waits until both are gone
    assert (marks / "polite").read_text().strip() == "SIGTERM"
    assert (marks / "stubborn").read_text().strip() == "ignored SIGTERM"  # it got SIGTERM, ignored it, then SIGKILL


def test_a_failed_containers_log_is_its_termination_message_on_request(cluster, kubectl):
    apply(kubectl, pod("by-log", "echo line one; echo CUDA out of memory; exit 1",
                       container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    term = container_state(wait_phase(cluster, kubectl, "by-log", phases=("Failed",)))["terminated"]
    assert term["exitCode"] == 1 and "CUDA out of memory" in term["message"]


def test_a_command_that_does_not_exist_is_a_start_error(cluster, kubectl):
    apply(kubectl, pod("nocmd", "", container={"command": ["no-such-program", "--help"]}))
    term = container_state(wait_phase(cluster, kubectl, "nocmd", phases=("Failed",)))["terminated"]
    assert (term["exitCode"], term["reason"]) == (128, "StartError")
    assert "no-such-program" in term["message"]


def test_active_deadline_fails_the_pod(cluster, kubectl):
    apply(kubectl, pod("slow", "exec sleep 600", activeDeadlineSeconds=3, terminationGracePeriodSeconds=2))
    p = wait_phase(cluster, kubectl, "slow", phases=("Failed",), timeout=60)
    assert p["status"]["reason"] == "DeadlineExceeded"


def test_on_failure_restarts_in_place(cluster, kubectl):
    script = "if [ ! -e /scratch/once ]; then touch /scratch/once; exit 2; fi; echo second run"
    apply(kubectl, pod("flaky", script, restart="OnFailure",
                       container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
                       volumes=[{"name": "scratch", "emptyDir": {}}]))
    p = wait_phase(cluster, kubectl, "flaky", timeout=90)
    cs = p["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 2
    assert "second run" in kubectl("logs", "flaky").stdout


def test_in_cluster_client_uses_the_projected_service_account_token(cluster, kubectl):
    cluster.load("operator")  # Python and the Kubernetes client
    script = ("from kubernetes import client, config\n"
              "config.load_incluster_config()\n"
              "print('version', client.VersionApi().get_code().git_version)\n"
              "print('ns', open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read())\n")
    apply(kubectl, pod("incluster", script, image=images.image_names()["operator"]))
    wait_phase(cluster, kubectl, "incluster")
    logs = kubectl("logs", "incluster").stdout
    assert "version v1.37" in logs
    assert f"ns {kubectl.namespace}" in logs
