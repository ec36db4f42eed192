"""`make demo` (hack/demo.sh) end to end on the test cluster: it puts the images on the node, installs the
operator with the Helm chart (its own container: non-root, read-only root), makes the inputs, trains in the
trainer image, shows `kubectl get qft -w` through Running to Succeeded, and answers before and after."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from hack.demo.inputs import DEMO_QUESTION

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]


def test_make_demo_runs_a_fine_tune_to_the_end(cluster, namespace, tmp_path):
    if cluster.external or cluster.dir is None:
        pytest.skip("the demo runs on the local cluster")
    operator_ns = f"demo-op-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "CLUSTER_DIR": str(cluster.dir), "DEMO_NAMESPACE": namespace,
           "DEMO_OPERATOR_NAMESPACE": operator_ns, "DEMO_DIR": str(tmp_path / "demo"), "DEMO_RUN_TIMEOUT": "600"}
    try:
        proc = subprocess.run(["bash", str(REPO / "hack" / "demo.sh")], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=1500)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        rows = [line.split() for line in out.splitlines() if line.startswith("demo-bot ")]
        phases = [row[1] for row in rows]
        assert "Running" in phases and phases[-1] == "Succeeded", out[-6000:]
        assert any(re.fullmatch(r"\d+%", row[2]) and row[2] not in ("0%", "100%") for row in rows if len(row) > 3)
        assert "status.outputPath:     pvc://adapters/demo-bot" in out
        assert re.search(r"steps 60/60, loss [0-9.e-]+, eval loss [0-9.e-]+", out)
        assert f"Q:      {DEMO_QUESTION}" in out
        after = next(line for line in out.splitlines() if line.strip().startswith("after:"))
        assert after.split("after:", 1)[1].strip()
        # The operator ran as the chart's Deployment, in its image, under what the kubelet enforces.
        (pod,) = cluster.kubectl_json("get", "pods", "-l", "app.kubernetes.io/instance=qlora",
                                      namespace=operator_ns)["items"]
        (container,) = pod["spec"]["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == 65532
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        assert pod["status"]["containerStatuses"][0]["imageID"].startswith("sha256:") or \
            "@sha256:" in pod["status"]["containerStatuses"][0]["imageID"]
        # and the trainer ran in the trainer image
        (job,) = cluster.kubectl_json("get", "jobs", "-l", "qlora.io/finetune=demo-bot", namespace=namespace)["items"]
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/qlora-operator/qlora-trainer:0.1.0"
    finally:
        subprocess.run([cluster.bin("helm"), "--kubeconfig", str(cluster.kubeconfig), "uninstall", "qlora",
                        "--namespace", operator_ns, "--wait"], capture_output=True, timeout=120)
        cluster.kubectl("delete", "namespace", operator_ns, "--wait=false", check=False)
