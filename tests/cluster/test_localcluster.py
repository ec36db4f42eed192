"""The local cluster does what issue 2 says: a real control plane, and a node agent that runs pods."""

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

from tests.conftest import LOCALCLUSTER, localcluster

pytestmark = pytest.mark.cluster

PY = "python:3.12"


def pod(name: str, script: str, image: str = PY, restart: str = "Never", **spec) -> dict:
    container = {"name": "main", "image": image, "command": ["python", "-c", script]}
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
    node = cluster.kubectl_json("get", "nodes")["items"][0]
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert int(node["status"]["capacity"]["nvidia.com/gpu"]) >= 1
    assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
    lease = cluster.kubectl_json("get", "lease", node["metadata"]["name"], namespace="kube-node-lease")
    assert lease["spec"]["holderIdentity"] == node["metadata"]["name"]


def test_second_cluster_starts_from_cache_is_idempotent_and_goes_down(cluster, tmp_path):
    if cluster.external:
        pytest.skip("starts local clusters")
    d = tmp_path / "second"
    first = localcluster("up", "--dir", str(d))
    # the session's cluster built (or found) the binaries; this start compiles nothing
    assert "cached, built nothing" in first.stdout, first.stdout
    try:
        ours = json.loads((d / "state.json").read_text())["ports"]
        theirs = json.loads((cluster.dir / "state.json").read_text())["ports"]
        assert ours["apiserver"] != theirs["apiserver"]  # two clusters at once, on their own ports
        nodes = subprocess.run([str(d / "bin" / "kubectl"), "--kubeconfig", str(d / "kubeconfig"), "get", "nodes"],
                               capture_output=True, text=True, check=True).stdout
        assert " Ready " in nodes
        for name in ("kubectl", "helm", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"):
            assert os.access(d / "bin" / name, os.X_OK), name
        helm = subprocess.run([str(d / "bin" / "helm"), "version", "--short"], capture_output=True, text=True)
        assert helm.returncode == 0 and helm.stdout.startswith("v3."), helm.stdout + helm.stderr
        again = localcluster("up", "--dir", str(d))
        assert "already running" in again.stdout
        status = localcluster("status", "--dir", str(d))
        assert "memory (RSS): control plane" in status.stdout
    finally:
        localcluster("down", "--dir", str(d))
    assert not d.exists()


def test_busy_port_and_stale_state_are_handled(cluster, tmp_path):
    if cluster.external:
        pytest.skip("starts local clusters")
    d = tmp_path / "third"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = localcluster("up", "--dir", str(d), "--apiserver-port", str(port)).stdout
        assert f"port {port} asked for kube-apiserver is busy" in out, out
    try:
        state = json.loads((d / "state.json").read_text())
        assert state["ports"]["apiserver"] != port
        # a crash: the API server dies; status says so, and the next `up` cleans up and starts again
        os.killpg(state["pids"]["kube-apiserver"], signal.SIGKILL)
        cluster.wait_until(lambda: localcluster("status", "--dir", str(d), check=False).returncode != 0, 30,
                           "status to notice the dead API server")
        assert "NOT RUNNING" in localcluster("status", "--dir", str(d), check=False).stdout
        out = localcluster("up", "--dir", str(d)).stdout
        assert "stale state" in out and "kube-apiserver" in out, out
        assert localcluster("status", "--dir", str(d)).returncode == 0
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


# ------------------------------------------------------------------------------------------ controllers

def test_job_completes_through_the_job_controller_and_logs_are_readable(cluster, kubectl):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "hello"},
           "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
               {"name": "main", "image": PY, "command": ["python", "-c", "print('hello from a job', 6 * 7)"]}]}}}}
    apply(kubectl, job)
    kubectl("wait", "--for=condition=Complete", "job/hello", "--timeout=120s", timeout=130)
    assert "hello from a job 42" in kubectl("logs", "job/hello").stdout
    pods = kubectl.json("get", "pods", "-l", "job-name=hello")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    term = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"


def test_pod_asking_too_many_gpus_is_unschedulable(cluster, kubectl):
    apply(kubectl, pod("greedy", "print(1)", container={"resources": {"limits": {"nvidia.com/gpu": "64"}}}))

    def unschedulable():
        p = kubectl.json("get", "pod", "greedy")
        cond = [c for c in p["status"].get("conditions", []) if c["type"] == "PodScheduled"]
        return cond and cond[0]["status"] == "False" and cond[0]["reason"] == "Unschedulable" and cond[0]
    cond = cluster.wait_until(unschedulable, 60, "PodScheduled=False/Unschedulable")
    assert "nvidia.com/gpu" in cond["message"]
    assert pod_phase(kubectl, "greedy") == "Pending"


def test_unknown_image_is_a_pull_error(cluster, kubectl):
    apply(kubectl, pod("unknown", "print(1)", image="registry.example.com/nobody/nothing:1.0"))
    seen = set()

    def reason():
        p = kubectl.json("get", "pod", "unknown")
        for cs in p["status"].get("containerStatuses", []):
            seen.add(cs["state"].get("waiting", {}).get("reason"))
        return "ErrImagePull" in seen
    cluster.wait_until(reason, 60, "waiting reason ErrImagePull", interval=0.3)
    assert pod_phase(kubectl, "unknown") == "Pending"
    cluster.wait_until(lambda: kubectl.json("get", "pod", "unknown")["status"]["containerStatuses"][0]["state"]
                       .get("waiting", {}).get("reason") == "ImagePullBackOff", 60, "ImagePullBackOff")


def test_deleting_the_owner_deletes_the_job(cluster, kubectl):
    apply(kubectl, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {}})
    uid = kubectl.json("get", "configmap", "owner")["metadata"]["uid"]
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "owned", "ownerReferences": [
               {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]},
           "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
               {"name": "main", "image": PY, "command": ["python", "-c", "import time; time.sleep(300)"]}]}}}}
    apply(kubectl, job)
    cluster.wait_until(lambda: kubectl.json("get", "pods", "-l", "job-name=owned")["items"], 60, "the job's pod")
    kubectl("delete", "configmap", "owner")
    cluster.wait_until(lambda: kubectl("get", "job", "owned", check=False).returncode != 0, 90,
                       "the garbage collector to delete the job")
    try:
        cluster.wait_until(lambda: not kubectl.json("get", "pods", "-l", "job-name=owned")["items"], 90,
                           "the job's pod to go")
    except BaseException:
        print(kubectl("get", "pods", "-o", "yaml").stdout)  # what held it, for the report
        raise


# ------------------------------------------------------------------------------------------ the node agent

def test_pod_reads_secret_env_and_configmap_file_at_its_mount_path(cluster, kubectl):
    apply(kubectl,
          {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}},
          {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "conf"},
           "data": {"settings.json": '{"lr": 0.001}'}},
          pod("reader", "import os; print('TOKEN=' + os.environ['HF_TOKEN']); "
                        "print('FILE=' + open('/etc/qlora/settings.json').read()); "
                        "print('NS=' + os.environ['MY_NS'], 'IP=' + os.environ['MY_IP'])",
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


def test_a_volume_over_the_checkout_does_not_hide_the_image_files(cluster, kubectl):
    # CI clones under /tmp, where pods mount an emptyDir: the repo and venv stand for the image's own
    # files and must stay visible under any volume, as they would inside a real image.
    repo_parent = str(Path(__file__).resolve().parents[2].parent)
    apply(kubectl, pod("covered", "import qlora_trainer.config, kubernetes; print('IMPORTED')",
                       container={"volumeMounts": [{"name": "scratch", "mountPath": repo_parent}]},
                       volumes=[{"name": "scratch", "emptyDir": {}}]))
    wait_phase(cluster, kubectl, "covered")
    assert "IMPORTED" in kubectl("logs", "covered").stdout


def test_missing_secret_is_a_config_error(cluster, kubectl):
    apply(kubectl, pod("nosecret", "print(1)", container={
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}))
    cluster.wait_until(lambda: container_state(kubectl.json("get", "pod", "nosecret")).get("waiting", {})
                       .get("reason") == "CreateContainerConfigError", 60, "CreateContainerConfigError")
    msg = container_state(kubectl.json("get", "pod", "nosecret"))["waiting"]["message"]
    assert 'secret "absent" not found' in msg


def test_pods_serve_the_same_port_on_their_own_ips(cluster, kubectl):
    server = ("import http.server, os\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers(); self.wfile.write(os.environ['NAME'].encode())\n"
              "http.server.HTTPServer((os.environ['POD_IP'], int(os.environ['PORT'])), H).serve_forever()\n")
    with socket.socket() as s:  # a port no process of the host holds on 0.0.0.0, which would shadow the pods
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "PORT", "value": str(port)}]
    apply(kubectl, *(pod(n, server, container={"env": env, "ports": [{"containerPort": port}]})
                     for n in ("web-a", "web-b")))
    ips = {}
    for name in ("web-a", "web-b"):
        p = wait_phase(cluster, kubectl, name, phases=("Running",))
        ips[name] = p["status"]["podIP"]
        assert p["status"]["podIPs"] == [{"ip": ips[name]}]
    assert ips["web-a"] != ips["web-b"]

    def answer(ip):
        try:
            return urllib.request.urlopen(f"http://{ip}:{port}/", timeout=2).read().decode()
        except OSError:
            return None
    for name, ip in ips.items():
        assert cluster.wait_until(lambda: answer(ip), 30, f"{name} to answer on {ip}:{port}") == name
    assert [pod_phase(kubectl, n) for n in ips] == ["Running", "Running"]
    kubectl("delete", "pod", "web-a", "web-b", "--grace-period=5", timeout=60)


def test_claim_is_provisioned_bound_and_mounted(cluster, kubectl):
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    writer = pod("writer", "import os; os.makedirs('/output/run', exist_ok=True); "
                           "open('/output/run/adapter.txt', 'w').write('weights')",
                 container={"volumeMounts": [{"name": "out", "mountPath": "/output"}]},
                 volumes=[{"name": "out", "persistentVolumeClaim": {"claimName": "data"}}])
    reader = pod("reader", "print(open('/in/adapter.txt').read())",
                 container={"volumeMounts": [{"name": "out", "mountPath": "/in", "subPath": "run", "readOnly": True}]},
                 volumes=[{"name": "out", "persistentVolumeClaim": {"claimName": "data"}}])
    apply(kubectl, pvc, writer)
    wait_phase(cluster, kubectl, "writer")
    claim = kubectl.json("get", "pvc", "data")
    assert claim["status"]["phase"] == "Bound"
    assert claim["spec"]["storageClassName"] == "local-path"  # the default StorageClass was applied
    pv = cluster.kubectl_json("get", "pv", claim["spec"]["volumeName"])
    if not cluster.external:
        assert Path(pv["spec"]["hostPath"]["path"], "run", "adapter.txt").read_text() == "weights"
    apply(kubectl, reader)
    wait_phase(cluster, kubectl, "reader")
    assert kubectl("logs", "reader").stdout.strip() == "weights"


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(cluster, kubectl, tmp_path):
    if cluster.external:
        pytest.skip("reads a hostPath folder of the local node")
    marks = tmp_path / "marks"
    marks.mkdir()
    polite = ("import signal, sys, time\n"
              "def bye(*_):\n"
              "    open('/marks/polite', 'w').write('SIGTERM'); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\n"
              "print('ready', flush=True)\n"
              "while True: time.sleep(1)\n")
    stubborn = ("import signal, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: open('/marks/stubborn', 'w').write('ignored SIGTERM'))\n"
                "print('ready', flush=True)\n"
                "while True: time.sleep(1)\n")
    mount = {"volumeMounts": [{"name": "marks", "mountPath": "/marks"}]}
    vols = [{"name": "marks", "hostPath": {"path": str(marks)}}]
    apply(kubectl, pod("polite", polite, container=mount, volumes=vols),
          pod("stubborn", stubborn, container=mount, volumes=vols, terminationGracePeriodSeconds=2))
    for name in ("polite", "stubborn"):
        wait_phase(cluster, kubectl, name, phases=("Running",))
        cluster.wait_until(lambda: "ready" in kubectl("logs", name).stdout, 30, f"{name} to print ready")
    kubectl("delete", "pod", "polite", "stubborn", timeout=90)  # waits until both are gone
    assert (marks / "polite").read_text() == "SIGTERM"
    assert (marks / "stubborn").read_text() == "ignored SIGTERM"  # it got SIGTERM, ignored it, got SIGKILL


def test_termination_message_and_exit_code_are_reported(cluster, kubectl):
    apply(kubectl,
          pod("by-file", "import sys; open('/dev/termination-log', 'w').write('{\"loss\": 0.5}'); sys.exit(3)"),
          pod("by-log", "import sys; print('line one'); print('CUDA out of memory'); sys.exit(1)",
              container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    term = container_state(wait_phase(cluster, kubectl, "by-file", phases=("Failed",)))["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (3, "Error", '{"loss": 0.5}')
    term = container_state(wait_phase(cluster, kubectl, "by-log", phases=("Failed",)))["terminated"]
    assert term["exitCode"] == 1 and "CUDA out of memory" in term["message"]


def test_a_command_that_does_not_exist_is_a_start_error(cluster, kubectl):
    apply(kubectl, pod("nocmd", "", container={"command": ["no-such-program", "--help"]}))
    term = container_state(wait_phase(cluster, kubectl, "nocmd", phases=("Failed",)))["terminated"]
    assert (term["exitCode"], term["reason"]) == (128, "StartError")
    assert "no-such-program" in term["message"]


def test_active_deadline_fails_the_pod(cluster, kubectl):
    apply(kubectl, pod("slow", "import time; time.sleep(600)", activeDeadlineSeconds=3))
    p = wait_phase(cluster, kubectl, "slow", phases=("Failed",), timeout=60)
    assert p["status"]["reason"] == "DeadlineExceeded"


def test_on_failure_restarts_in_place(cluster, kubectl):
    script = ("import os, sys\n"
              "if not os.path.exists('/scratch/once'):\n"
              "    open('/scratch/once', 'w').write('x'); sys.exit(2)\n"
              "print('second run')\n")
    apply(kubectl, pod("flaky", script, restart="OnFailure",
                       container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
                       volumes=[{"name": "scratch", "emptyDir": {}}]))
    p = wait_phase(cluster, kubectl, "flaky", timeout=90)
    cs = p["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 2
    assert "second run" in kubectl("logs", "flaky").stdout


def test_in_cluster_client_uses_the_projected_service_account_token(cluster, kubectl):
    script = ("from kubernetes import client, config\n"
              "config.load_incluster_config()\n"
              "print('version', client.VersionApi().get_code().git_version)\n"
              "print('ns', open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read())\n")
    apply(kubectl, pod("incluster", script))
    wait_phase(cluster, kubectl, "incluster")
    logs = kubectl("logs", "incluster").stdout
    assert "version v1.37" in logs
    assert f"ns {kubectl.namespace}" in logs
