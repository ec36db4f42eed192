"""A real Prometheus server (Debian's `prometheus` package) for tests: started on a free loopback port with a
generated config and a temporary storage folder, stopped and removed afterwards.

    with PrometheusServer(tmp_path, [kubernetes_pods_job(kubeconfig, "ns")]) as prom:
        prom.wait_for_series('{__name__="qlora_trainer_step"}')

`kubernetes_pods_job` is the plain kubernetes_sd scrape config a user without prometheus-operator would
write: it finds trainer pods through the API server and gives their series the `namespace` and `pod` labels a
PodMonitor gives, which is what the operator's Prometheus mode selects on.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

SCRAPE_INTERVAL = "1s"
TRAINER_POD_LABEL = "qlora.io/finetune"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def static_job(name: str, targets: list[str], labels: dict[str, str]) -> dict[str, Any]:
    """A job scraping fixed `host:port` targets, each series labelled with `labels`."""
    return {"job_name": name, "static_configs": [{"targets": targets, "labels": labels}]}


def _sd_label(label: str) -> str:
    # Prometheus' name for a pod label in kubernetes_sd meta labels: non-alphanumerics become `_`.
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in label)


def kubernetes_pods_job(kubeconfig: Path, namespaces: list[str] | None = None, port: int = 9090,
                        pod_label: str = TRAINER_POD_LABEL) -> dict[str, Any]:
    """A kubernetes_sd job scraping `<pod IP>:<port>/metrics` of every running pod carrying `pod_label`."""
    config = yaml.safe_load(Path(kubeconfig).read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    tls = {"ca_file": cluster["certificate-authority"]}
    if "client-certificate" in user:
        tls.update(cert_file=user["client-certificate"], key_file=user["client-key"])
    sd: dict[str, Any] = {"role": "pod", "api_server": cluster["server"], "tls_config": tls}
    if namespaces:
        sd["namespaces"] = {"names": list(namespaces)}
    return {
        "job_name": "qlora-trainers",
        "kubernetes_sd_configs": [sd],
        "relabel_configs": [
            {"source_labels": [_sd_label(pod_label)], "regex": ".+", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_ip"], "target_label": "__address__",
             "replacement": f"$1:{port}"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ],
    }


class PrometheusServer:
    """One Prometheus process; use as a context manager. `url` is its base URL."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]], scrape_interval: str = SCRAPE_INTERVAL):
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed (apt-get install -y prometheus)")
        self.binary = binary
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": scrape_interval},
            "scrape_configs": scrape_configs,
        }
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> PrometheusServer:
        config_file = self.dir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config_file}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                 "--web.enable-lifecycle", "--log.level=info"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"prometheus not ready within {timeout:g}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as r:
            return json.loads(r.read())

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("query", query=promql)["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["data"]["activeTargets"]

    def wait_for_series(self, promql: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Poll until the query returns something; on timeout, the error names the targets' health."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.5)
        health = [(t.get("scrapeUrl"), t.get("health"), t.get("lastError")) for t in self.targets()]
        raise AssertionError(f"Prometheus has no series for {promql} after {timeout:g}s; targets: {health}\n"
                             f"{self.tail()}")
