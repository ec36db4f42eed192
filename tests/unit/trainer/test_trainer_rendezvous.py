"""The nodes of a multi-node run meet at start: a node whose peers never come fails in the time the run allows,
with `RendezvousTimeout` and a message that says what to look at; and every worker resumes from the same
checkpoint, or the run stops and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from qlora_trainer.contract import FailureReason
from qlora_trainer.launch import DEFAULT_RENDEZVOUS_TIMEOUT, rendezvous_failure, torchrun_command
from test_trainer_training import free_port

TRAINER_DIR = Path(__file__).resolve().parents[3] / "trainer"
NODES = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1"}


def test_the_rendezvous_timeout_comes_from_the_environment_with_torchruns_default():
    from qlora_trainer.config import TrainerConfig

    cfg = TrainerConfig.model_validate({"dataset": {"path": "d.jsonl"}, "output": {"dir": "/out"}, "gpus": 0})
    env = {**NODES, "NODE_RANK": "1", "MASTER_PORT": "29500"}
    assert f"--rdzv-conf=timeout={DEFAULT_RENDEZVOUS_TIMEOUT}" in torchrun_command(cfg, [], env)
    assert "--rdzv-conf=timeout=45" in torchrun_command(cfg, [], {**env, "RENDEZVOUS_TIMEOUT_SECONDS": "45"})
    assert not any(arg.startswith("--rdzv-conf") for arg in torchrun_command(cfg, [], {}))  # one node: no wait


@pytest.mark.parametrize("said, timed_out", [
    ("DistStoreError: Timed out after 31 seconds waiting for clients. 1/2 clients joined.", True),
    ("DistNetworkError: The client socket has timed out after 30000ms while trying to connect to (a, 1).", True),
    ("ChildFailedError: worker 0 failed (exitcode 70)", False),
    ("DistNetworkError: Connection reset by peer", False),
])
def test_only_a_rendezvous_that_timed_out_is_called_one(said, timed_out):
    error = {"message": {"message": said, "extraInfo": {"py_callstack": "..."}}}
    message = rendezvous_failure(error, {**NODES, "NODE_RANK": "0", "MASTER_PORT": "29500",
                                         "RENDEZVOUS_TIMEOUT_SECONDS": "30"})
    assert (message is not None) == timed_out
    if timed_out:
        assert message.startswith("the 2 nodes of the run did not all start within 30 s: node 0 waited at "
                                  "127.0.0.1:29500")
        assert "runtime.rendezvousTimeoutSeconds" in message
    assert rendezvous_failure(None) is None and rendezvous_failure({"message": "not json of torchrun"}) is None


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_node_whose_peer_never_starts_fails_in_time_with_rendezvous_timeout(tmp_path, rank):
    """The real command line and torchrun: node 0 waits for clients that never connect; node 1 for a master
    that never listens. Both end after the timeout they were given (the run's limit of 300 s is half of
    torchrun's own 600 s), which reached torchrun's command line."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dataset": {"path": str(tmp_path / "d.jsonl")}, "output": {"dir": str(tmp_path)},
                                  "gpus": 0, "terminationMessagePath": str(tmp_path / "termination-log")}))
    env = {**os.environ, **NODES, "NODE_RANK": rank, "MASTER_PORT": str(free_port()),
           "RENDEZVOUS_TIMEOUT_SECONDS": "10", "PYTHONPATH": str(TRAINER_DIR), "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "qlora_trainer", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == FailureReason.RENDEZVOUS_TIMEOUT.exit_code, done.stderr[-3000:]
    assert " --rdzv-conf=timeout=10 " in done.stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["reason"] == "RendezvousTimeout" and summary["exitCode"] == 71
    assert summary["message"].startswith(f"the 2 nodes of the run did not all start within 10 s: node {rank} waited")
    assert f"RendezvousTimeout: {summary['message']}" in done.stderr


def _resume_from(rank: int, world: int, store: str, paths: list, results) -> None:
    import torch
    import torch.distributed as dist

    from qlora_trainer.errors import InvalidConfig
    from qlora_trainer.training import same_checkpoint_everywhere

    torch.set_num_threads(1)  # a forked child must not enter the OpenMP pool its parent started
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        same_checkpoint_everywhere(Path(paths[rank]) if paths[rank] else None)
        results.put((rank, None))
    except InvalidConfig as err:
        results.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def agree(tmp_path, paths: list) -> dict[int, str | None]:
    context = mp.get_context("fork")  # the workers need only what this process imported
    results = context.Queue()
    store = tmp_path / f"store-{time.monotonic_ns()}"
    workers = [context.Process(target=_resume_from, args=(rank, len(paths), str(store), paths, results))
               for rank in range(len(paths))]
    for worker in workers:
        worker.start()
    said = dict(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    return said


def test_every_worker_resumes_from_the_same_checkpoint_or_the_run_says_the_volume_is_not_shared(tmp_path):
    same = "/output/run/checkpoints/checkpoint-20"
    assert agree(tmp_path, [same, same]) == {0: None, 1: None}
    assert agree(tmp_path, [None, None]) == {0: None, 1: None}
    said = agree(tmp_path, [same, None])
    assert said[0] == said[1] and said[0] is not None
    assert said[0].startswith(f"the workers found different checkpoints to resume from (worker 0: {same}, "
                              "worker 1: none)")
    assert "output.pvc" in said[0]
