"""Checkpoints and outputs are whole or absent (issue 19, item 4): a save stopped half-way never becomes the
checkpoint a restart resumes from; a checkpoint whose files a crash cut short is skipped for the one before (no
crash loop); the final outputs appear whole, summary.json last, and a SIGTERM while they are written waits."""

from __future__ import annotations

import json
import logging
import signal

import pytest

from qlora_trainer.checkpoints import (
    MANIFEST,
    OUTPUTS_STAGING,
    STAGING,
    checkpoint_problem,
    last_valid_checkpoint,
    publish_checkpoint,
    publish_outputs,
)
from qlora_trainer.config import TrainerConfig
from qlora_trainer.testing import bilingual_qa_records, tiny_config, write_jsonl


def fake_checkpoint(folder, step, *, state=True, weights=True, marker=False):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"x" * 10)
    if marker:
        (path / "checkpoint-is-incomplete.txt").write_text("")
    return path


def test_last_valid_checkpoint_skips_incomplete_ones(tmp_path):
    assert last_valid_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 15, state=False)  # killed while saving (a checkpoint of an older trainer)
    fake_checkpoint(tmp_path, 20, marker=True)
    fake_checkpoint(tmp_path, 25, weights=False)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_valid_checkpoint(tmp_path).name == "checkpoint-10"


def test_a_published_checkpoint_lists_its_files_and_one_cut_short_is_skipped_for_the_one_before(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (5, 10):
        staged = fake_checkpoint(root / STAGING, step)
        (staged / "optimizer.pt").write_bytes(b"o" * 1000)
        publish_checkpoint(staged, root / staged.name)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-10", "checkpoint-5"]  # the staging folder went
    assert json.loads((root / "checkpoint-10" / MANIFEST).read_text())["files"]["optimizer.pt"] == 1000
    assert last_valid_checkpoint(root).name == "checkpoint-10"

    # The node crashed before the page cache reached the disk: the state is intact, the optimizer cut short.
    with (root / "checkpoint-10" / "optimizer.pt").open("r+b") as f:
        f.truncate(300)
    assert checkpoint_problem(root / "checkpoint-10") == "optimizer.pt has 300 bytes of 1000"
    with caplog.at_level(logging.WARNING):
        assert last_valid_checkpoint(root).name == "checkpoint-5"
    assert "skipping checkpoint" in caplog.text and "optimizer.pt has 300 bytes of 1000" in caplog.text
    (root / "checkpoint-5" / "optimizer.pt").unlink()
    assert checkpoint_problem(root / "checkpoint-5") == "optimizer.pt is missing"


def test_publishing_a_step_again_replaces_what_an_attempt_before_left(tmp_path):
    root = tmp_path / "checkpoints"
    broken = fake_checkpoint(root, 10, weights=False)
    (broken / "stray").write_text("from the attempt before")
    staged = fake_checkpoint(root / STAGING, 10)
    publish_checkpoint(staged, root / "checkpoint-10")
    assert not (root / "checkpoint-10" / "stray").exists() and last_valid_checkpoint(root).name == "checkpoint-10"


def test_outputs_move_in_with_the_summary_last(tmp_path, monkeypatch):
    import os

    out = tmp_path / "out"
    staged = out / OUTPUTS_STAGING
    (staged / "merged").mkdir(parents=True)
    for name in ("summary.json", "adapter_model.safetensors", "tokenizer.json", "merged/model.safetensors"):
        (staged / name).write_text(name)
    (out / "merged").mkdir()
    (out / "merged" / "old.safetensors").write_text("an attempt before")
    moved = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(b)), replace(a, b)))
    publish_outputs(staged, out, last="summary.json")
    assert moved[-1] == "summary.json" and sorted(moved) == sorted(["summary.json", "adapter_model.safetensors",
                                                                    "tokenizer.json", "merged"])
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "merged", "summary.json",
                                                     "tokenizer.json"]
    assert [p.name for p in (out / "merged").iterdir()] == ["model.safetensors"]


# ------------------------------------------------------------------------------------ real runs

def run_config(tmp_path, tiny_model_dir, **training) -> TrainerConfig:
    data = write_jsonl(tmp_path / "data.jsonl", bilingual_qa_records(2))
    return TrainerConfig.model_validate(tiny_config(tiny_model_dir, data, tmp_path / "out", batchSize=2,
                                                    gradientAccumulationSteps=1, maxLength=40, evalEvery=1000,
                                                    **training))


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (no except Exception, no finally of the trainer's own)."""


def test_a_save_killed_half_way_is_never_resumed_from_and_a_truncated_one_is_skipped(tmp_path, tiny_model_dir,
                                                                                     monkeypatch, caplog):
    from qlora_trainer import training
    from qlora_trainer.training import QLoRATrainer, train

    cfg = run_config(tmp_path, tiny_model_dir, maxSteps=10, checkpointEvery=5)
    checkpoints = tmp_path / "out" / "checkpoints"
    optimizer_save = QLoRATrainer._save_optimizer_and_scheduler

    def killed_at_step_10(self, output_dir):
        if self.state.global_step == 10:  # the adapter of step 10 is written, its optimizer state not yet
            raise Killed
        return optimizer_save(self, output_dir)

    monkeypatch.setattr(QLoRATrainer, "_save_optimizer_and_scheduler", killed_at_step_10)
    with pytest.raises(Killed):
        train(cfg)
    assert sorted(p.name for p in checkpoints.iterdir()) == [".partial", "checkpoint-5"]
    assert (checkpoints / ".partial" / "checkpoint-10" / "adapter_model.safetensors").is_file()
    assert last_valid_checkpoint(checkpoints).name == "checkpoint-5"

    # The retry resumes from step 5, clears the half-written save, and ends at step 10 whole.
    monkeypatch.setattr(QLoRATrainer, "_save_optimizer_and_scheduler", optimizer_save)
    assert train(cfg)["step"] == 10
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert checkpoint_problem(checkpoints / "checkpoint-10") is None

    # A crash cut checkpoint 10's optimizer state short after it was published: a longer run resumes from step 5
    # instead of failing on it at every restart, and writes step 10 anew.
    with (checkpoints / "checkpoint-10" / "optimizer.pt").open("r+b") as f:
        f.truncate(100)
    longer = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 15})})
    resumed = []
    monkeypatch.setattr(training.TrainerMetrics, "resuming", lambda self, **at: resumed.append(at["step"]))
    with caplog.at_level(logging.WARNING):
        assert train(longer)["step"] == 15
    assert resumed == [5]
    assert "skipping checkpoint" in caplog.text and "checkpoint-10: optimizer.pt has 100 bytes of" in caplog.text
    assert all(checkpoint_problem(p) is None for p in checkpoints.iterdir())
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-15", "checkpoint-5"]


def test_final_outputs_killed_half_way_leave_nothing_half_written_in_place(tmp_path, tiny_model_dir, monkeypatch):
    from qlora_trainer.training import train

    cfg = run_config(tmp_path, tiny_model_dir, maxSteps=3, checkpointEvery=1000)
    out = tmp_path / "out"

    def killed(self):  # the adapter and tokenizer are written; the resolved config never is
        raise Killed

    monkeypatch.setattr(TrainerConfig, "to_wire", killed)
    with pytest.raises(Killed):
        train(cfg)
    assert (out / OUTPUTS_STAGING / "adapter_model.safetensors").is_file()
    assert (out / OUTPUTS_STAGING / "tokenizer.json").is_file()
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()
    # The retry writes them whole and clears the staged ones. The final checkpoint is there: nothing is left to
    # train (the Trainer alone would take a step past maxSteps), and the summary still has the run's values.
    monkeypatch.undo()
    summary = train(cfg)
    assert (summary["step"], summary["totalSteps"]) == (3, 3) and summary["loss"] is not None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors", "summary.json", "tokenizer.json",
        "tokenizer_config.json", "trainer-config.json"]
    assert not (out / OUTPUTS_STAGING).exists()


def test_a_sigterm_while_the_outputs_are_written_waits_for_them(tmp_path, tiny_model_dir, monkeypatch):
    from qlora_trainer import output
    from qlora_trainer.training import StopOnSignal, train

    cfg = run_config(tmp_path, tiny_model_dir, maxSteps=3, checkpointEvery=1000)
    stop = StopOnSignal()
    write = output.publish_outputs

    def signalled_half_way(staged, out, last):
        stop._handle(signal.SIGTERM, None)  # as the kubelet's SIGTERM would land
        write(staged, out, last)

    monkeypatch.setattr(output, "publish_outputs", signalled_half_way)
    summary = train(cfg, stop=stop)
    assert stop.signalled and summary["step"] == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["step"] == 3
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
