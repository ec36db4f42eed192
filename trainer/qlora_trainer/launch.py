"""Data-parallel runs: with `gpus` above 1, or several nodes (the operator sets NNODES, NODE_RANK, MASTER_ADDR
and MASTER_PORT), `python -m qlora_trainer` starts one worker per GPU through torchrun and exits with the
code of the run. Rank 0 serves the metrics and writes the outputs and the termination summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from .config import TrainerConfig

log = logging.getLogger(__name__)

# NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM: on a host whose GPUs others share, a
# program that uses it can put them all out of service. Defaults: a value the environment already has is kept.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


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
        ]
    else:
        command += ["--standalone"]
    return [*command, "-m", "qlora_trainer", *argv]


def worker_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The workers' environment: this process's, with NVLink multicast off where it does not say otherwise."""
    return {**MULTICAST_OFF, **env}


def launch(cfg: TrainerConfig, argv: list[str]) -> int:
    """Run the workers and return the run's exit code: rank 0's, as its termination summary says, else
    torchrun's. SIGTERM and SIGINT go on to torchrun, which hands them to every worker."""
    command = torchrun_command(cfg, argv)
    log.info("starting %d worker(s) on this node: %s", max(cfg.gpus, 1), " ".join(command))
    started = time.time()
    process = subprocess.Popen(command, env=worker_env())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: process.send_signal(signum))
    code = process.wait()
    summary = Path(cfg.termination_message_path)
    try:
        if summary.stat().st_mtime >= started:
            return int(json.loads(summary.read_text())["exitCode"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return code
