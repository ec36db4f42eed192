"""Operator scale: create N QLoRAFinetune resources at once on the local cluster; time creation -> Job created.

Starts (or reuses) the local cluster, installs the CRD, runs the operator as a subprocess watching one fresh
namespace, POSTs N resources (suspended, so no pods run: this measures the operator, not the node) with
bounded concurrency, and polls the namespace's Jobs every POLL seconds. Prints p50/p90/p99/max of the time from
each resource's POST returning to its Job first being seen, the wall time for all, and the operator's peak
resident memory (VmHWM).

    .venv/bin/python bench/operator_scale.py [--count 200] [--cluster-dir .localcluster] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer"), str(REPO)]

from tests.cluster.operator_fixture import CRD, OperatorProcess  # noqa: E402
from tests.conftest import LOCALCLUSTER, LocalCluster  # noqa: E402

POLL = 0.1


def up(cluster_dir: Path | None) -> tuple[LocalCluster, bool]:
    d = cluster_dir or Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    subprocess.run([sys.executable, str(LOCALCLUSTER), "up", "--dir", str(d)], check=True)
    return LocalCluster(d, d / "kubeconfig", d / "bin"), cluster_dir is None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def api_call_means(text: str) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "qlora_operator_api_request_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                entry = sums.setdefault(sample.labels["verb"], [0.0, 0.0])
                entry[sample.name.endswith("_count")] += sample.value
    return ", ".join(f"{verb} {total / count:.3f}s x{count:.0f}" for verb, (total, count) in sorted(sums.items())
                     if count)


def resource(name: str) -> dict:
    return {
        "apiVersion": "qlora.io/v1alpha1", "kind": "QLoRAFinetune", "metadata": {"name": name},
        "spec": {"dataset": {"configMap": {"name": "qa", "key": "data.jsonl"}},
                 "output": {"pvc": {"claimName": "adapters", "path": name}},
                 "resources": {"gpus": 1}, "suspend": True},
    }


async def run(cluster: LocalCluster, namespace: str, count: int, concurrency: int) -> dict[str, float]:
    from qlora_operator.kube import Kube, path

    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    kube = await Kube.connect()
    created: dict[str, float] = {}
    seen: dict[str, float] = {}
    posts: list[float] = []  # round trips of the POSTs: what one API call costs on this machine now
    limit = asyncio.Semaphore(concurrency)

    async def create(name: str) -> None:
        async with limit:
            body = resource(name)
            body["metadata"]["namespace"] = namespace
            t = time.monotonic()
            await kube.request("POST", path("QLoRAFinetune", namespace), body)
            created[name] = time.monotonic()
            posts.append(created[name] - t)

    async def watch_jobs() -> None:
        while len(seen) < count:
            page = await kube.request("GET", path("Job", namespace))
            now = time.monotonic()
            for job in page.get("items") or ():
                seen.setdefault(job["metadata"]["name"], now)
            await asyncio.sleep(POLL)

    names = [f"run-{i:04d}" for i in range(count)]
    watcher = asyncio.create_task(watch_jobs())
    t0 = time.monotonic()
    await asyncio.gather(*(create(n) for n in names))
    posted = time.monotonic() - t0
    await asyncio.wait_for(watcher, timeout=600)
    wall = time.monotonic() - t0
    await kube.close()
    latencies = [max(0.0, seen[n] - created[n]) for n in names]
    return {"posted": posted, "wall": wall, "latencies": latencies, "posts": posts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--cluster-dir", type=Path, default=None, help="reuse this local cluster (else a new one)")
    args = parser.parse_args()

    cluster, owned = up(args.cluster_dir)
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    op = None
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRD))
        cluster.kubectl("create", "namespace", namespace)
        cluster.kubectl("create", "configmap", "qa", "--from-literal=data.jsonl={}", namespace=namespace)
        cluster.kubectl("apply", "-f", "-", namespace=namespace, input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "adapters"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
        op = OperatorProcess(cluster, [namespace]).start()
        idle_rss, cpu0 = op.rss_bytes(), op.cpu_seconds()
        result = asyncio.run(run(cluster, namespace, args.count, args.concurrency))
        busy = op.cpu_seconds() - cpu0
        time.sleep(2)  # let the last status patches land before reading memory
        lat = result["latencies"]
        print(f"operator_scale: {args.count} QLoRAFinetunes (suspended), POSTed with concurrency "
              f"{args.concurrency} in {result['posted']:.2f}s; all Jobs seen after {result['wall']:.2f}s")
        print(f"creation -> Job created (s, poll {POLL}s): p50 {statistics.median(lat):.3f}  "
              f"p90 {percentile(lat, 90):.3f}  p99 {percentile(lat, 99):.3f}  max {max(lat):.3f}")
        print(f"one API call for scale (POST round trip under this load): p50 {statistics.median(result['posts']):.3f}s; "
              "the operator makes 4 in a row from a resource's watch event to its Job (GET the named objects "
              "at once, POST ConfigMap, POST Job) plus kopf's bookkeeping")
        print(f"operator CPU: {busy:.1f}s over {result['wall']:.1f}s wall ({os.cpu_count()} CPUs on this machine, "
              f"load average {os.getloadavg()[0]:.1f})")
        print(f"operator memory: idle RSS {idle_rss / 2**20:.1f} MiB, peak RSS (VmHWM) "
              f"{op.peak_rss_bytes() / 2**20:.1f} MiB, now {op.rss_bytes() / 2**20:.1f} MiB")
        print("the operator's own API calls (mean seconds, count):", api_call_means(op.metrics()))
        hist = [line for line in op.metrics().splitlines()
                if line.startswith(("qlora_operator_job_created_seconds_count", "qlora_operator_finetunes{",
                                    "qlora_operator_reconcile_errors_total"))]
        print("operator metrics:", "; ".join(hist))
    finally:
        if op is not None:
            op.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        if owned:
            subprocess.run([sys.executable, str(LOCALCLUSTER), "down", "--dir", str(cluster.dir)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
