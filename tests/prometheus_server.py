"""A real Prometheus server (Debian's `prometheus` package) for tests: started on a free loopback port with a
generated config and a temporary storage folder, stopped and removed afterwards.

    sd = KubernetesPodsSD(kubeconfig, ["ns"])
    with PrometheusServer(tmp_path, [kubernetes_pods_job(sd.url)]) as prom:
        prom.wait_for_series('{__name__="qlora_trainer_step"}')

`kubernetes_pods_job` is the scrape config a user without prometheus-operator writes for trainer pods (keep
the pods labelled `qlora.io/finetune`, label series with `namespace` and `pod`, as a PodMonitor does), which is
what the operator's Prometheus mode selects on. Debian's Prometheus has no kubernetes_sd, so the pods come
from `KubernetesPodsSD`, an http_sd endpoint giving them kubernetes_sd's meta labels.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

SCRAPE_INTERVAL = "500ms"
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


def pod_targets(pods: list[dict[str, Any]], port: int = 9090) -> list[dict[str, Any]]:
    """Prometheus targets for pods, with the meta labels kubernetes_sd (role: pod) gives them."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        if not status.get("podIP"):
            continue
        labels = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": status["podIP"],
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
        }
        labels.update({_sd_label(k): v for k, v in (meta.get("labels") or {}).items()})
        groups.append({"targets": [f"{status['podIP']}:{port}"], "labels": labels})
    return groups


class KubernetesPodsSD:
    """An HTTP service-discovery endpoint listing a cluster's pods with kubernetes_sd's meta labels.

    Debian's Prometheus is built without kubernetes_sd; this stands in for it over http_sd, so the scrape
    config keeps the relabelling a kubernetes_sd (or PodMonitor) user writes.
    """

    def __init__(self, kubeconfig: Path, namespaces: list[str], port: int = 9090):
        from kubernetes import client, config

        self.api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        self.namespaces, self.port = list(namespaces), port
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                pods = [p for ns in outer.namespaces
                        for p in outer.api.list_namespaced_pod(ns).to_dict(serialize=True)["items"]]
                body = json.dumps(pod_targets(pods, outer.port)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/targets"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def kubernetes_pods_job(sd_url: str, pod_label: str = TRAINER_POD_LABEL) -> dict[str, Any]:
    """A job scraping `<pod IP>:9090/metrics` of every running pod carrying `pod_label`, from an SD endpoint
    with kubernetes_sd's meta labels; its series get the `namespace` and `pod` labels a PodMonitor gives."""
    return {
        "job_name": "qlora-trainers",
        "http_sd_configs": [{"url": sd_url, "refresh_interval": "1s"}],
        "relabel_configs": [
            {"source_labels": [_sd_label(pod_label)], "regex": ".+", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
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
