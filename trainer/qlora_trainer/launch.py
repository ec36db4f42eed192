"""Data-parallel runs: with `gpus` above 1, or several nodes (the operator sets NNODES, NODE_RANK, MASTER_ADDR
and MASTER_PORT), `python -m qlora_trainer` starts one worker per GPU through torchrun and exits with the
code of the run. Rank 0 serves the metrics and writes the outputs and the termination summary.

Across nodes the workers meet once, at start, in torchrun's static rendezvous at MASTER_ADDR. A node whose pod
never starts (no room for it, an image that cannot be pulled) would keep the others waiting there: each waits
at most RENDEZVOUS_TIMEOUT_SECONDS (the resource's `runtime.rendezvousTimeoutSeconds`), then fails with
`RendezvousTimeout`, a failure the Job retries."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from .config import TrainerConfig
from .contract import FailureReason

log = logging.getLogger(__name__)

# NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM: on a host whose GPUs others share, a
# program that uses it can put them all out of service. Defaults: a value the environment already has is kept.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# torchrun's own default for the static rendezvous, when the environment names none.
DEFAULT_RENDEZVOUS_TIMEOUT = 600
# How torch's TCPStore says that the rendezvous timed out: the master waited for the other nodes, or a node
# could not reach the master.
_RENDEZVOUS_TIMED_OUT = re.compile(r"^Dist(Store|Network)Error: .*timed out", re.IGNORECASE)


def is_worker(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is already one of torchrun's workers."""
    return "LOCAL_RANK" in env


def is_main_process(env: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 of the whole run (or a run of one process)."""
    return env.get("RANK", "0") == "0"


def needs_launcher(cfg: TrainerConfig, env: Mapping[str, str] = os.environ) -> bool:
    return not is_worker(env) and (cfg.gpus > 1 or int(env.get("NNODES", "1")) > 1)


def torchrun_command(cfg: TrainerConfig, argv: list[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """The torchrun command line that runs this trainer on every GPU of this node, and across nodes when
    NNODES is above 1 (a static rendezvous at MASTER_ADDR:MASTER_PORT, node rank NODE_RANK)."""
    nodes = int(env.get("NNODES", "1"))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={max(cfg.gpus, 1)}"]
    if nodes > 1:
        command += [
            f"--nnodes={nodes}",
            f"--node-rank={env['NODE_RANK']}",
            f"--master-addr={env['MASTER_ADDR']}",
            f"--master-port={env['MASTER_PORT']}",
            f"--rdzv-conf=timeout={rendezvous_timeout(env)}",
        ]
    else:
        command += ["--standalone"]
    return [*command, "-m", "qlora_trainer", *argv]


def rendezvous_timeout(env: Mapping[str, str] = os.environ) -> int:
    """Seconds the nodes wait for each other at start."""
    return int(env.get("RENDEZVOUS_TIMEOUT_SECONDS") or DEFAULT_RENDEZVOUS_TIMEOUT)


def rendezvous_failure(error: Mapping | None, env: Mapping[str, str] = os.environ) -> str | None:
    """What to tell a person when torchrun failed because the nodes did not all meet in time, from its error
    file (TORCHELASTIC_ERROR_FILE); None for any other failure."""
    said = ((error or {}).get("message") or {})
    said = said.get("message") if isinstance(said, Mapping) else said
    if not isinstance(said, str) or not _RENDEZVOUS_TIMED_OUT.search(said):
        return None
    nodes, rank = env.get("NNODES", "?"), env.get("NODE_RANK", "?")
    return (f"the {nodes} nodes of the run did not all start within {rendezvous_timeout(env)} s: node {rank} waited "
            f"at {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} ({said}); a pod that cannot start (no node with "
            "room for it, an image that cannot be pulled) keeps the others waiting: see the run's pods and "
            "events, or raise runtime.rendezvousTimeoutSeconds if they start slowly")


def worker_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The workers' environment: this process's, with NVLink multicast off where it does not say otherwise."""
    return {**MULTICAST_OFF, **env}


def launch(cfg: TrainerConfig, argv: list[str]) -> int:
    """Run the workers and return the run's exit code: rank 0's, as its termination summary says, else
    torchrun's; a rendezvous that timed out is written as the summary of this pod. SIGTERM and SIGINT go on
    to torchrun, which hands them to every worker."""
    from .output import failure_summary, write_termination_message

    command = torchrun_command(cfg, argv)
    log.info("starting %d worker(s) on this node: %s", max(cfg.gpus, 1), " ".join(command))
    started = time.time()
    error_file = Path(os.environ.get("TMPDIR") or "/tmp") / f"torchrun-error-{os.getpid()}.json"
    error_file.unlink(missing_ok=True)
    process = subprocess.Popen(command, env={**worker_env(), "TORCHELASTIC_ERROR_FILE": str(error_file)})
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: process.send_signal(signum))
    code = process.wait()
    summary = Path(cfg.termination_message_path)
    try:
        if summary.stat().st_mtime >= started:
            return int(json.loads(summary.read_text())["exitCode"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        timed_out = rendezvous_failure(json.loads(error_file.read_text())) if code else None
    except (OSError, ValueError):
        timed_out = None
    if timed_out:
        reason = FailureReason.RENDEZVOUS_TIMEOUT
        log.error("%s: %s", reason.value, timed_out)
        write_termination_message(str(summary), failure_summary("Failed", reason.exit_code, timed_out, reason.value, None))
        return reason.exit_code
    return code
