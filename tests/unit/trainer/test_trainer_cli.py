"""The command line: each failure class exits with its code, writes a termination summary within 4 KiB and
a message naming the cause; SIGTERM saves a checkpoint and a restart resumes to the same end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qlora_trainer.__main__ import main
from qlora_trainer.contract import EXIT_TERMINATED, TERMINATION_MESSAGE_LIMIT, FailureReason
from qlora_trainer.output import termination_message
from qlora_trainer.testing import bilingual_qa_records, tiny_config, write_jsonl

TRAINER_DIR = Path(__file__).resolve().parents[3] / "trainer"


@pytest.fixture(autouse=True)
def keep_sigterm():
    """main() installs a SIGTERM handler; give the test process its own back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def run_main(tmp_path, document) -> tuple[int, dict]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document, default=str))
    code = main(["--config", str(path)])
    summary = json.loads((tmp_path / "termination-log").read_text())
    return code, summary


def document(tmp_path, model_dir, records=None, **training):
    data = write_jsonl(tmp_path / "data.jsonl", records or bilingual_qa_records(1))
    doc = tiny_config(model_dir, data, tmp_path / "out", **training)
    doc["terminationMessagePath"] = str(tmp_path / "termination-log")
    return doc


def assert_failed(code, summary, reason: FailureReason, *fragments):
    assert code == reason.exit_code
    assert summary["status"] == "Failed" and summary["reason"] == reason.value and summary["exitCode"] == code
    for fragment in fragments:
        assert fragment in summary["message"], summary["message"]


def test_invalid_config_names_the_field(tmp_path, tiny_model_dir):
    doc = document(tmp_path, tiny_model_dir)
    doc["lora"]["rank"] = 8
    doc["training"]["learningRate"] = 5
    code, summary = run_main(tmp_path, doc)
    assert_failed(code, summary, FailureReason.INVALID_CONFIG, "lora.rank", "training.learningRate")


def test_unreadable_config_is_invalid_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code = main(["--config", str(tmp_path / "config.json")])
    assert code == FailureReason.INVALID_CONFIG.exit_code


def test_config_from_the_environment(tmp_path, tiny_model_dir, monkeypatch):
    doc = document(tmp_path, tiny_model_dir, optimizer="sgd_but_faster")
    monkeypatch.setenv("QLORA_CONFIG", json.dumps(doc, default=str))
    code = main([])
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert_failed(code, summary, FailureReason.INVALID_CONFIG, "unknown optimizer 'sgd_but_faster'", "adamw_torch")


def test_invalid_lora_target_is_invalid_config(tmp_path, tiny_model_dir):
    code, summary = run_main(tmp_path, {**document(tmp_path, tiny_model_dir),
                                        "lora": {"targetModules": ["wq"], "dropout": 0}})
    assert_failed(code, summary, FailureReason.INVALID_CONFIG, "wq match no layer", "q_proj")


def test_bad_record_is_dataset_invalid(tmp_path, tiny_model_dir):
    records = bilingual_qa_records(1) + [{"question": "Where?"}]
    code, summary = run_main(tmp_path, document(tmp_path, tiny_model_dir, records=records))
    assert_failed(code, summary, FailureReason.DATASET_INVALID, f"line {len(records)}", "`answer`", "expected")


def test_empty_data_is_dataset_invalid(tmp_path, tiny_model_dir):
    doc = document(tmp_path, tiny_model_dir)
    Path(doc["dataset"]["path"]).write_text("")
    code, summary = run_main(tmp_path, doc)
    assert_failed(code, summary, FailureReason.DATASET_INVALID, "empty")


def test_missing_model_is_model_load_failed(tmp_path):
    code, summary = run_main(tmp_path, document(tmp_path, tmp_path / "no-model-here"))
    assert_failed(code, summary, FailureReason.MODEL_LOAD_FAILED, "no-model-here")


def test_cuda_out_of_memory_hints_at_batch_size_and_length(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    from qlora_trainer.training import QLoRATrainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(QLoRATrainer, "training_step", out_of_memory)
    code, summary = run_main(tmp_path, document(tmp_path, tiny_model_dir, batchSize=4, maxLength=64))
    assert_failed(code, summary, FailureReason.CUDA_OUT_OF_MEMORY, "training.batchSize=4", "training.maxLength=64",
                  "Tried to allocate 2.00 GiB")


def test_unexpected_error_is_training_failed(tmp_path, tiny_model_dir, monkeypatch):
    from qlora_trainer.training import QLoRATrainer

    def broken(self, *args, **kwargs):
        raise RuntimeError("the loss went sideways")

    monkeypatch.setattr(QLoRATrainer, "training_step", broken)
    code, summary = run_main(tmp_path, document(tmp_path, tiny_model_dir))
    assert_failed(code, summary, FailureReason.TRAINING_FAILED, "RuntimeError: the loss went sideways")


def test_asking_for_a_gpu_where_none_is_visible_says_gpus_0_trains_on_the_cpu(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, said for a GPU one too
    doc = document(tmp_path, tiny_model_dir)
    doc["gpus"] = 1
    code, summary = run_main(tmp_path, doc)
    assert_failed(code, summary, FailureReason.INVALID_CONFIG, "gpus: 1", "no GPU", "set gpus: 0 to train on the CPU")
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before anything was loaded


def test_termination_message_stays_within_the_limit():
    summary = {"status": "Failed", "reason": "DatasetInvalid", "exitCode": 65, "message": "x" * 10_000,
               "step": 3, "versions": {"torch": "2"}}
    text = termination_message(summary)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = json.loads(text)
    assert parsed["reason"] == "DatasetInvalid" and parsed["step"] == 3 and parsed["message"].startswith("xxx")
    korean = {**summary, "message": "잘못된 레코드 " * 2000}
    assert len(termination_message(korean).encode()) <= TERMINATION_MESSAGE_LIMIT


# ------------------------------------------------------------------ preemption


def start_trainer(config_path: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(TRAINER_DIR), "HF_HUB_OFFLINE": "1"}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "qlora_trainer", "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )


def scrape_step(port: int) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("qlora_trainer_step "):
            return float(line.split()[1])
    return None


def test_sigterm_saves_a_checkpoint_and_a_restart_ends_like_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from test_trainer_training import free_port

    records = bilingual_qa_records(4)
    steps = 24
    runs = {}
    for name in ("straight", "preempted"):
        folder = tmp_path / name
        folder.mkdir()
        # No periodic checkpoint: the only one the preempted run can resume from is SIGTERM's.
        doc = document(folder, tiny_model_dir, records=records, maxSteps=steps, checkpointEvery=1000,
                       evalEvery=1000, packing=False, batchSize=2, gradientAccumulationSteps=2)
        doc["lora"]["dropout"] = 0.1  # resume must restore the random state too
        doc["metrics"] = {"port": free_port(), "host": "127.0.0.1"}
        (folder / "config.json").write_text(json.dumps(doc, default=str))
        runs[name] = (folder, doc)

    folder, doc = runs["straight"]
    assert start_trainer(folder / "config.json", folder / "log").wait(timeout=600) == 0
    straight = json.loads((folder / "out" / "summary.json").read_text())

    folder, doc = runs["preempted"]
    process = start_trainer(folder / "config.json", folder / "log")
    try:
        deadline = time.monotonic() + 600
        while (scrape_step(doc["metrics"]["port"]) or 0) < 3:
            assert process.poll() is None and time.monotonic() < deadline, (folder / "log").read_text()[-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == EXIT_TERMINATED, (folder / "log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    stopped = json.loads((folder / "termination-log").read_text())
    assert stopped["status"] == "Terminated" and "checkpoint saved" in stopped["message"]
    (checkpoint,) = (folder / "out" / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 3 <= stopped_at < steps and stopped["step"] == stopped_at
    assert not (folder / "out" / "summary.json").exists()

    assert start_trainer(folder / "config.json", folder / "log").wait(timeout=600) == 0
    assert f"resuming from {checkpoint}" in (folder / "log").read_text()
    resumed = json.loads((folder / "out" / "summary.json").read_text())
    assert resumed["step"] == straight["step"] == steps
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-3)
    assert resumed["evalLoss"] == pytest.approx(straight["evalLoss"], rel=1e-3)
    assert resumed["tokensTotal"] == straight["tokensTotal"]


# ------------------------------------------------------------------ data parallel


def test_launcher_runs_one_worker_per_gpu_and_spans_nodes():
    from qlora_trainer.config import TrainerConfig
    from qlora_trainer.launch import needs_launcher, torchrun_command

    cfg = TrainerConfig.model_validate({"dataset": {"path": "d.jsonl"}, "output": {"dir": "/out"}, "gpus": 4})
    assert needs_launcher(cfg, {}) and not needs_launcher(cfg, {"LOCAL_RANK": "0"})
    assert not needs_launcher(cfg.model_copy(update={"gpus": 1}), {})
    assert needs_launcher(cfg.model_copy(update={"gpus": 1}), {"NNODES": "2"})
    single = torchrun_command(cfg, ["--config", "c.json"], {})
    assert "--nproc-per-node=4" in single and "--standalone" in single
    assert single[-4:] == ["-m", "qlora_trainer", "--config", "c.json"]
    env = {"NNODES": "3", "NODE_RANK": "1", "MASTER_ADDR": "job-0.svc", "MASTER_PORT": "29500"}
    multi = torchrun_command(cfg, [], env)
    assert {"--nnodes=3", "--node-rank=1", "--master-addr=job-0.svc", "--master-port=29500"} <= set(multi)
    assert "--standalone" not in multi


def test_workers_start_with_nvlink_multicast_off_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    from qlora_trainer import launch
    from qlora_trainer.config import TrainerConfig

    started = []

    class Torchrun:  # as launch() sees it
        def __init__(self, command, env):
            started.append(env)

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", Torchrun)
    monkeypatch.setattr(launch.signal, "signal", lambda signum, handler: None)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "0")
    cfg = TrainerConfig.model_validate({"dataset": {"path": "d.jsonl"}, "output": {"dir": str(tmp_path)}, "gpus": 2,
                                        "terminationMessagePath": str(tmp_path / "termination-log")})
    assert launch.launch(cfg, ["--config", "c.json"]) == 0
    (env,) = started
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "0"  # the environment's own
    assert env["PATH"] == os.environ["PATH"]


def test_data_parallel_workers_stop_together_when_one_is_signalled(tmp_path, tiny_model_dir):
    """Two CPU workers under torchrun: a SIGTERM to rank 1 alone stops both at the same step with one
    checkpoint; rank 0 alone serves metrics and writes the termination summary."""
    import psutil
    from test_trainer_training import free_port

    doc = document(tmp_path, tiny_model_dir, records=bilingual_qa_records(4), maxSteps=500,
                   checkpointEvery=1000, evalEvery=1000)
    doc["metrics"] = {"port": free_port(), "host": "127.0.0.1"}
    (tmp_path / "config.json").write_text(json.dumps(doc, default=str))
    env = {**os.environ, "PYTHONPATH": str(TRAINER_DIR), "HF_HUB_OFFLINE": "1"}
    with (tmp_path / "log").open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             "-m", "qlora_trainer", "--config", str(tmp_path / "config.json")],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    workers = []
    try:
        deadline = time.monotonic() + 600
        while (scrape_step(doc["metrics"]["port"]) or 0) < 3:
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.05)
        workers = psutil.Process(agent.pid).children(recursive=True)
        (rank_1,) = [p for p in workers if p.environ().get("RANK") == "1"]
        rank_1.send_signal(signal.SIGTERM)
        agent.wait(timeout=300)
    finally:
        for process in [agent, *workers]:  # a hung run must not outlive the test
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["status"] == "Terminated" and summary["exitCode"] == EXIT_TERMINATED
    (checkpoint,) = (tmp_path / "out" / "checkpoints").iterdir()
    assert checkpoint.name == f"checkpoint-{summary['step']}" and summary["step"] < 500


def test_a_sigterm_during_the_workers_agreement_is_not_lost(monkeypatch):
    """The handler can run while the all-reduce of a step's end waits for the other workers (its C call returns,
    then Python runs the handler before the result is stored). That SIGTERM must stop the run at the next step,
    not be written over by the agreement the workers reached before it."""
    from types import SimpleNamespace

    from qlora_trainer.training import StopOnSignal

    stop = StopOnSignal()
    stop.training = True
    agreements = []

    def all_reduce_during_which_sigterm_lands(flag, device):
        agreements.append(flag)
        if len(agreements) == 1:
            stop._handle(signal.SIGTERM, None)  # lands after the flags were exchanged
        return flag

    monkeypatch.setattr(StopOnSignal, "_anywhere", staticmethod(all_reduce_during_which_sigterm_lands))
    args, state = SimpleNamespace(device="cpu"), SimpleNamespace()
    first = SimpleNamespace(should_save=False, should_training_stop=False)
    stop.on_step_end(args, state, first)
    assert not first.should_training_stop  # the workers agreed on "go on" before the signal came
    second = SimpleNamespace(should_save=False, should_training_stop=False)
    stop.on_step_end(args, state, second)
    assert agreements == [False, True]
    assert second.should_save and second.should_training_stop and stop.requested
