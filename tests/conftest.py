"""Shared pytest fixtures: a real Kubernetes cluster for the cluster and e2e tests.

Fixtures (the API other tests rely on; keep it stable):

- `cluster` (session): a `LocalCluster`, started once per test session in a fresh temporary folder and
  torn down at the end. Attributes and methods:
    - `dir` (Path), `kubeconfig` (Path), `external` (bool), `env` (dict for subprocesses: KUBECONFIG and a
      PATH that finds kubectl and helm first);
    - `bin(name)`: path of `kubectl`, `helm`, `kube-apiserver`, ... (`cluster.bin("helm")`);
    - `kubectl(*args, input=None, check=True, namespace=None, timeout=120)` -> CompletedProcess;
    - `kubectl_json(*args, namespace=None)` -> parsed `-o json` output;
    - `wait_until(fn, timeout=60, what="...")` -> fn's first truthy result, else fails with `what`;
    - `load(*images)`: puts images on the node (idempotent): `operator` and `trainer`, the project's images
      built from its Dockerfiles (cached; the first trainer build takes minutes), or image archive paths;
      on an external cluster they must be there already.
- `namespace` (function): a fresh namespace (its `default` ServiceAccount exists), deleted after the test.
- `kubectl` (function): `cluster.kubectl` bound to `namespace`: `kubectl("get", "pods")` runs in it.

Choosing the cluster:
- default: a new local cluster per session with the real node (kubelet, containerd, runc:
  hack/localcluster/localcluster.py up --node real --dir <tmp>); one node per machine, so the session stops
  with a message while another cluster's node runs (`make cluster-down`, or reuse it as below);
- `QLORA_TEST_CLUSTER_DIR=.localcluster`: reuse a cluster started by `make cluster` (left running);
- `QLORA_TEST_EXTERNAL_CLUSTER=1` with `KUBECONFIG`: run against that cluster (its nodes must have the images).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCALCLUSTER = REPO / "hack" / "localcluster" / "localcluster.py"


class KubectlError(AssertionError):
    """kubectl exited non-zero; the message holds its command line and stderr."""


class LocalCluster:
    def __init__(self, dir: Path | None, kubeconfig: Path, bin_dir: Path, external: bool = False):
        self.dir, self.kubeconfig, self.bin_dir, self.external = dir, Path(kubeconfig), Path(bin_dir), external

    def bin(self, name: str) -> str:
        path = self.bin_dir / name
        return str(path) if path.exists() else name

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}"}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, namespace: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [self.bin("kubectl"), "--kubeconfig", str(self.kubeconfig)]
        if namespace:
            cmd += ["--namespace", namespace]
        cmd += [str(a) for a in args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(f"{' '.join(cmd[3:])} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def kubectl_json(self, *args: str, namespace: str | None = None) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json", namespace=namespace).stdout)

    def wait_until(self, fn, timeout: float = 60, what: str = "condition", interval: float = 0.5):
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                result = fn()
                if result:
                    return result
            except KubectlError as e:
                last_error = e
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error})"
                                                                          if last_error else ""))

    def load(self, *images: str | Path) -> None:
        """Put images on the node: `operator`, `trainer` or image archives (imported once per cluster)."""
        if self.external or self.dir is None:
            return
        localcluster("load", "--dir", str(self.dir), *map(str, images))


def localcluster(*args: str, check: bool = True, env: dict | None = None,
                 timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run the localcluster CLI with this interpreter; output (stdout+stderr) is in .stdout."""
    proc = subprocess.run([sys.executable, str(LOCALCLUSTER), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"localcluster {' '.join(args)} failed:\n{proc.stdout}")
    return proc


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> LocalCluster:
    if os.environ.get("QLORA_TEST_EXTERNAL_CLUSTER") == "1" and os.environ.get("KUBECONFIG"):
        # kubectl and helm of the pinned release when they can be built, else whatever PATH has
        bin_dir = tmp_path_factory.mktemp("bin")
        built = localcluster("build", check=False)
        if built.returncode == 0:
            cache = Path(built.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
            (bin_dir / "kubectl").symlink_to(cache / "localkube")
            (bin_dir / "helm").symlink_to(cache / "helm")
        yield LocalCluster(None, Path(os.environ["KUBECONFIG"]), bin_dir, external=True)
        return
    reuse = os.environ.get("QLORA_TEST_CLUSTER_DIR")
    if reuse:
        d = Path(reuse).absolute()
        localcluster("up", "--dir", str(d), "--node", "real")  # a no-op when it runs already
        yield LocalCluster(d, d / "kubeconfig", d / "bin")
        return
    d = tmp_path_factory.mktemp("localcluster")
    # --owner-pid: should this session be killed before its teardown, the cluster goes down by itself
    localcluster("up", "--dir", str(d), "--node", "real", "--owner-pid", str(os.getpid()))
    try:
        yield LocalCluster(d, d / "kubeconfig", d / "bin")
    finally:
        localcluster("down", "--dir", str(d), check=False)


@pytest.fixture
def namespace(cluster: LocalCluster):
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    # pods are refused until the namespace's default ServiceAccount exists
    cluster.wait_until(lambda: cluster.kubectl("get", "serviceaccount", "default", namespace=name, check=False)
                       .returncode == 0, timeout=60, what=f"the default ServiceAccount of {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def kubectl(cluster: LocalCluster, namespace: str):
    def run(*args: str, input: str | None = None, check: bool = True, timeout: float = 120):
        return cluster.kubectl(*args, input=input, check=check, namespace=namespace, timeout=timeout)
    run.json = lambda *args: cluster.kubectl_json(*args, namespace=namespace)
    run.namespace = namespace
    return run
