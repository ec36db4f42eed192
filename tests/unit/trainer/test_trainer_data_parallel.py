"""Data-parallel training on the CPU: two workers under torchrun (gloo) running the real trainer on the tiny
4-bit model. LoRA dropout stays on in every training forward of every rank, also after an evaluation; and two
workers with half the batch each learn as one worker with the whole batch.

Run as a script (`torchrun ... test_trainer_data_parallel.py RECORD_DIR --config FILE`), this file is a worker:
the trainer's own `main`, with every dropout forward recorded to RECORD_DIR/rank-N.json."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

TRAINER_DIR = Path(__file__).resolve().parents[3] / "trainer"


def torchrun(tmp_path: Path, doc: dict, workers: int, worker_args: list[str] | None = None) -> Path:
    """Run `doc` on `workers` CPU processes under torchrun: the trainer itself, or this file as the worker
    when `worker_args` are given. Returns the run's output folder."""
    folder = tmp_path / f"{workers}-workers"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(doc, default=str))
    program = [__file__, *worker_args] if worker_args is not None else ["-m", "qlora_trainer"]
    env = {**os.environ, "PYTHONPATH": str(TRAINER_DIR), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with (folder / "log").open("wb") as log:
        code = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
             *program, "--config", str(folder / "config.json")],
            stdout=log, stderr=subprocess.STDOUT, env=env, timeout=600,
        ).returncode
    assert code == 0, (folder / "log").read_text()[-3000:]
    return Path(doc["output"]["dir"])


def test_lora_dropout_is_on_in_every_training_forward_of_every_rank_after_an_evaluation(tmp_path, tiny_model_dir):
    from qlora_trainer.testing import bilingual_qa_records, tiny_config, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", bilingual_qa_records(2))
    doc = tiny_config(tiny_model_dir, data, tmp_path / "out", maxSteps=4, evalEvery=2, checkpointEvery=1000,
                      batchSize=2, gradientAccumulationSteps=1)
    doc["lora"]["dropout"] = 0.1
    records = tmp_path / "records"
    records.mkdir()
    torchrun(tmp_path, doc, 2, worker_args=[str(records)])

    for rank in (0, 1):
        forwards = json.loads((records / f"rank-{rank}.json").read_text())
        # (grad enabled, dropout in training mode) of the LoRA dropout forwards, a run of equal ones counted once:
        # the evaluations at the start, at step 2 and at the end, with dropout on in the training between them.
        phases = [tuple(key) for key, _ in itertools.groupby(forwards)]
        assert phases == [(False, False), (True, True), (False, False), (True, True), (False, False)], rank


def record_dropout_and_train(records: Path, argv: list[str]) -> int:
    """The worker: the trainer's `main`, with every `nn.Dropout` forward's (grad enabled, training mode) saved."""
    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook

    from qlora_trainer.__main__ import main

    forwards = []

    def record(module, args):
        if isinstance(module, torch.nn.Dropout):
            forwards.append((torch.is_grad_enabled(), module.training))

    register_module_forward_pre_hook(record)
    code = main(argv)
    (records / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(forwards))
    return code


if __name__ == "__main__":
    sys.exit(record_dropout_and_train(Path(sys.argv[1]), sys.argv[2:]))
