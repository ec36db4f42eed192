"""Kueue, the real controller (hack/localcluster/kueue.py), against the test session's local cluster.

Import it in a test module (`from tests.cluster.kueue_fixture import kueue  # noqa: F401`):

- `kueue` (session): a `KueueProcess`. When `localcluster.py up` already runs Kueue (its state names a live
  `kueue`), that one; else one started here (built or found in the cache) and stopped at the session's end,
  its webhooks unregistered. The ResourceFlavor `default` exists. `cluster_queue(...)`, `local_queue(...)`
  build the objects a test applies (a ClusterQueue is cluster-wide: name it after the test's namespace and
  delete it after); `workload(kubectl, job)` is the Workload Kueue made for a Job, or None.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hack.localcluster import kueue as kueue_lib
from hack.localcluster import localcluster as lc

# Stops Kueue should this session be killed before its teardown (the cluster's own --owner-pid does the rest).
WATCHDOG = """import os, signal, sys, time
owner, pid = int(sys.argv[1]), int(sys.argv[2])
while os.path.exists(f"/proc/{owner}") and os.path.exists(f"/proc/{pid}"):
    time.sleep(2)
try:
    os.killpg(pid, signal.SIGTERM)
except OSError:
    pass
"""


@dataclass
class KueueProcess:
    pid: int
    ports: dict
    log: Path

    cluster_queue = staticmethod(kueue_lib.cluster_queue)
    local_queue = staticmethod(kueue_lib.local_queue)

    @staticmethod
    def workload(kubectl, job: dict) -> dict | None:
        items = kubectl.json("get", "workloads", "-l", f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}")["items"]
        return items[0] if items else None

    def log_tail(self) -> str:
        return lc.tail(self.log, 40)


@pytest.fixture(scope="session")
def kueue(cluster):
    if cluster.external or cluster.dir is None:
        pytest.skip("Kueue is started only on the local cluster")
    state = json.loads((cluster.dir / "state.json").read_text())
    log = cluster.dir / "logs" / "kueue.log"
    running = state["pids"].get("kueue")
    if running and lc.alive(running):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(kueue_lib.resource_flavor()))
        yield KueueProcess(running, {}, log)  # its ports are localcluster's business
        return
    go = lc.find_go()
    if go is None:
        pytest.fail("Kueue is built with Go: install Go 1.25 or newer, or set GO=/path/to/go")
    try:
        binary = kueue_lib.build(go)
        pid, ports = kueue_lib.start(cluster.dir, f"https://127.0.0.1:{state['ports']['apiserver']}",
                                     cluster.dir / "pki", binary, log, timeout=120)
    except kueue_lib.KueueError as e:
        pytest.fail(str(e))
    subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(pid)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(kueue_lib.resource_flavor()))
        yield KueueProcess(pid, ports, log)
    finally:
        kueue_lib.stop(cluster.dir, pid)
