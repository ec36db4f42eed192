"""`make demo` (hack/demo.sh) end to end on the test cluster: it installs the CRD, runs the operator, makes
the inputs, trains, shows `kubectl get qft -w` through Running to Succeeded, and answers before and after."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from hack.demo.inputs import DEMO_QUESTION

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]


def test_make_demo_runs_a_fine_tune_to_the_end(cluster, namespace, tmp_path):
    if cluster.external or cluster.dir is None:
        pytest.skip("the demo runs on the local cluster")
    env = {**os.environ, "CLUSTER_DIR": str(cluster.dir), "DEMO_NAMESPACE": namespace,
           "DEMO_DIR": str(tmp_path / "demo"), "DEMO_RUN_TIMEOUT": "600"}
    proc = subprocess.run(["bash", str(REPO / "hack" / "demo.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=840)
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
    # The demo's operator is gone afterwards, and nothing of it is left in the cluster's way.
    pid = int((tmp_path / "demo" / "operator.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "qlora_operator" not in Path(f"/proc/{pid}/cmdline").read_text()
