"""Run the operator (`python -m qlora_operator`) as a subprocess against the test cluster.

For cluster and e2e tests (import the fixtures in a conftest or test module:
`from tests.cluster.operator_fixture import crd, operator, start_operator, standin_image  # noqa: F401`):

- `crd` (session): installs crds/qlorafinetunes.qlora.io.yaml and waits until it is Established.
- `operator` (function): an `OperatorProcess` watching only the test's `namespace`, started and ready; stopped
  at the end of the test. Its log is printed when a test fails (pytest shows captured output).
- `start_operator(cluster, namespaces, **settings)` -> OperatorProcess, started: for a second operator, other
  settings (`trainer_image="..."`, `status_min_interval=1`, ... any `Settings` field, given as flags), or
  another namespace set. Stop it yourself (`stop()`), or use it as a context manager.
- `standin_image` (session): an image (`qlora-standin:1`, on the node) whose pods run
  tests/cluster/standin/qlora_trainer instead of the real trainer: it validates the operator's config and
  then sleeps/exits as its environment says (STANDIN_SLEEP, STANDIN_EXIT, STANDIN_MESSAGE, STANDIN_SUMMARY).
  Built from tests/cluster/standin/Containerfile on the operator image (cached), and imported into the node.

`OperatorProcess`: `start()`, `stop()` (SIGTERM, then SIGKILL), `kill()` (SIGKILL: a crash), `restart()`,
`running`, `pid`, `log(since_start=False)` (what it printed), `metrics()` (its Prometheus text), `healthy()`,
`cpu_seconds()`, `rss_bytes()` (resident memory now) and `peak_rss_bytes()` (VmHWM, the peak so far).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "qlorafinetunes.qlora.io.yaml"
STANDIN = REPO / "tests" / "cluster" / "standin"
STANDIN_IMAGE = "qlora-standin:1"

sys.path.insert(0, str(REPO / "hack" / "localcluster"))
import images  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class OperatorProcess:
    def __init__(self, cluster, namespaces: list[str] | tuple[str, ...] = (), **settings):
        self.cluster = cluster
        self.namespaces = list(namespaces)
        self.metrics_port = settings.pop("metrics_port", None) or free_port()
        self.health_port = settings.pop("health_port", None) or free_port()
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self._started_at = 0
        self._log = tempfile.NamedTemporaryFile(prefix="qlora-operator-", suffix=".log", delete=False)

    @property
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "qlora_operator", "--namespaces", ",".join(self.namespaces),
                "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port)]
        for name, value in self.settings.items():
            argv += [_flag(name), str(value)]
        return argv

    @property
    def env(self) -> dict[str, str]:
        pythonpath = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), str(REPO)])
        return {**self.cluster.env, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}

    def start(self, timeout: float = 60) -> OperatorProcess:
        assert not self.running, "already running"
        self._started_at = Path(self._log.name).stat().st_size
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                pytest.fail(f"the operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the operator was not healthy within {timeout:.0f}s:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, grace: float = 20) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code."""
        if not self.running:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL, as a crash or an OOM kill would end it."""
        if self.running:
            self.proc.kill()
        return self.proc.wait(10) if self.proc else None

    def restart(self) -> OperatorProcess:
        self.stop()
        return self.start()

    def log(self, since_start: bool = False) -> str:
        """What the operator printed: all of it, or only since the last `start()`."""
        text = Path(self._log.name).read_bytes()
        return (text[self._started_at:] if since_start else text).decode(errors="replace")

    def _get(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except OSError:
            return 0, ""

    def healthy(self) -> bool:
        return self._get(self.health_port, "/healthz")[0] == 200

    def metrics(self) -> str:
        return self._get(self.metrics_port, "/metrics")[1]

    def _status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time the operator process has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        return self._status_kib("VmRSS")

    def peak_rss_bytes(self) -> int:
        return self._status_kib("VmHWM")

    def __enter__(self) -> OperatorProcess:
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if exc[0] is not None:
            print(f"--- operator log ---\n{self.log()[-8000:]}")


def start_operator(cluster, namespaces, **settings) -> OperatorProcess:
    return OperatorProcess(cluster, namespaces, **settings).start()


@pytest.fixture(scope="session")
def crd(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    # Polled rather than `kubectl wait`, which fails at once while the new CRD has no conditions yet.
    name = "qlorafinetunes.qlora.io"
    cluster.wait_until(lambda: any(c.get("type") == "Established" and c.get("status") == "True" for c in (
        cluster.kubectl_json("get", "crd", name).get("status") or {}).get("conditions") or ()),
        timeout=60, what=f"CRD {name} to be Established")
    return CRD


@pytest.fixture(scope="session")
def standin_image(cluster) -> str:
    if not cluster.external:
        cluster.load(images.ensure_derived(STANDIN_IMAGE, STANDIN / "Containerfile"))
    return STANDIN_IMAGE


@pytest.fixture
def operator(cluster, crd, namespace, request):
    proc = start_operator(cluster, [namespace])
    yield proc
    proc.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is None or failed.failed:
        print(f"--- operator log ---\n{proc.log()[-8000:]}")


def finetune(name: str, image: str | None = None, env: dict | None = None, **spec) -> dict:
    """A small QLoRAFinetune for the stand-in trainer: the `qa` ConfigMap and `adapters` claim, CPU, 3 steps,
    no retries; `image` left out means the operator's default trainer image, and `runtime` overrides win."""
    runtime = {**({"image": image} if image else {}), "backoffLimit": 0, **spec.pop("runtime", {})}
    if env:
        runtime["env"] = [{"name": k, "value": str(v)} for k, v in env.items()]
    body = {
        "dataset": {"configMap": {"name": "qa", "key": "data.jsonl"}},
        "output": {"pvc": {"claimName": "adapters", "path": name}},
        "resources": {"gpus": 0},
        "training": {"maxSteps": 3},
        "runtime": runtime,
        **spec,
    }
    return {"apiVersion": "qlora.io/v1alpha1", "kind": "QLoRAFinetune", "metadata": {"name": name}, "spec": body}
