"""Training: the arguments map every field, a real QLoRA run on the CPU learns (eval loss, generations),
writes its outputs, and keeps /metrics current while it runs; checkpoints are found and validated."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import urllib.request

import pytest

from qlora_trainer.config import TrainerConfig
from qlora_trainer.contract import Metric, Phase
from qlora_trainer.errors import InvalidConfig
from qlora_trainer.testing import bilingual_qa_records, tiny_config, write_jsonl
from qlora_trainer.training import training_arguments


STEPS = 30  # enough for the tiny model to learn the answers by heart


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp_path, **training) -> TrainerConfig:
    return TrainerConfig.model_validate(tiny_config("model", "data.jsonl", tmp_path / "out", **training))


def test_training_arguments_map_every_field(tmp_path):
    cfg = TrainerConfig.model_validate(
        {
            "dataset": {"path": "d.jsonl"},
            "training": {
                "epochs": 2, "batchSize": 3, "gradientAccumulationSteps": 5, "learningRate": 2e-4,
                "scheduler": "linear", "warmupRatio": 0.1, "optimizer": "adamw_torch", "maxGradNorm": 0.5,
                "weightDecay": 0.02, "gradientCheckpointing": True, "seed": 7, "checkpointEvery": 11,
                "evalEvery": 13, "packing": False, "reportTo": ["tensorboard"],
            },
            "output": {"dir": str(tmp_path)},
            "gpus": 0,
        }
    )
    args = training_arguments(cfg, has_eval=True, packing=False)
    assert args.output_dir == str(tmp_path / "checkpoints")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 5)
    assert (args.num_train_epochs, args.max_steps, args.learning_rate) == (2, -1, 2e-4)
    assert args.lr_scheduler_type == "linear" and args.warmup_steps == 0.1 and args.optim == "adamw_torch"
    assert (args.max_grad_norm, args.weight_decay, args.seed, args.data_seed) == (0.5, 0.02, 7, 7)
    assert args.activation_checkpointing
    assert (args.save_steps, args.eval_steps, args.eval_strategy) == (11, 13, "steps")
    assert args.save_total_limit == 3 and args.report_to == ["tensorboard"] and args.use_cpu
    assert not args.logging_nan_inf_filter  # it would read the loss back (a host sync) every micro-batch
    assert args.logging_steps == 0.01  # a hundred logs a run, each a read-back; every step up to 100 steps
    # Pinned memory and copies that do not wait are for a GPU (on one, TrainingArguments needs CUDA here).
    assert not args.dataloader_pin_memory and not args.accelerator_config.non_blocking
    # With packing the loader hands over a whole optimizer step: the same examples per step.
    packed = training_arguments(cfg, has_eval=False, packing=True)
    assert (packed.per_device_train_batch_size, packed.gradient_accumulation_steps) == (15, 1)
    assert packed.eval_strategy == "no"


def test_unknown_optimizer_is_rejected_with_the_known_names(tmp_path):
    cfg = config(tmp_path, optimizer="adamw_fast_please")
    with pytest.raises(InvalidConfig, match=r"unknown optimizer 'adamw_fast_please'; known: .*paged_adamw_8bit"):
        training_arguments(cfg, has_eval=False, packing=False)


def test_a_resumed_run_says_where_it_goes_on_before_it_loads_the_model(tmp_path, monkeypatch):
    from qlora_trainer import training
    from qlora_trainer.metrics import TrainerMetrics

    cfg = config(tmp_path)
    checkpoint = tmp_path / "out" / training.CHECKPOINTS / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10, "epoch": 0.5, "max_steps": 30}))
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
    metrics = TrainerMetrics()
    seen = {}

    class Loading(Exception):
        pass

    def load_model(cfg):  # the slow part: what /metrics says by then is what a status shows meanwhile
        seen.update(metrics.values)
        raise Loading

    monkeypatch.setattr(training, "load_model", load_model)
    with pytest.raises(Loading):
        training.train(cfg, metrics)
    assert seen[Metric.PHASE] == Phase.LOADING.value
    assert (seen[Metric.STEP], seen[Metric.EPOCH], seen[Metric.TOTAL_STEPS], seen[Metric.LAST_CHECKPOINT_STEP]) == \
        (10, 0.5, 30, 10)


class Scraper(threading.Thread):
    """Reads /metrics every few milliseconds while training runs, keeping every sample it saw."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.seen: list[dict[str, float]] = []
        self.phases: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        while not self.stopped.is_set():
            try:
                text = urllib.request.urlopen(self.url, timeout=2).read().decode()
            except OSError:
                time.sleep(0.02)
                continue
            values = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == Metric.PHASE.full:
                        if sample.value == 1 and (not self.phases or self.phases[-1] != sample.labels[sample.name]):
                            self.phases.append(sample.labels[sample.name])
                    else:
                        values[sample.name] = sample.value
            self.seen.append(values)
            time.sleep(0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One real QLoRA run (4-bit, packing, accumulation across packed parts) with /metrics scraped."""
    from qlora_trainer.metrics import TrainerMetrics
    from qlora_trainer.training import train

    folder = tmp_path_factory.mktemp("run")
    data = write_jsonl(folder / "data.jsonl", bilingual_qa_records(6))
    port = free_port()
    document = tiny_config(
        tiny_model_dir, data, folder / "out", maxSteps=STEPS, batchSize=4, gradientAccumulationSteps=2,
        maxLength=40, checkpointEvery=10, evalEvery=15,
    )
    document["metrics"] = {"port": port, "host": "127.0.0.1"}
    cfg = TrainerConfig.model_validate(document)
    scraper = Scraper(port)
    scraper.start()
    metrics = TrainerMetrics()
    metrics.serve(port, "127.0.0.1")
    try:
        summary = train(cfg, metrics)
        # One more scrape after `done` (a state to wait for: on a loaded machine the scraper may lag).
        seen = len(scraper.seen)
        deadline = time.monotonic() + 60
        while len(scraper.seen) <= seen + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scraper.stopped.set()
        scraper.join()
        metrics.close()
    return {"cfg": cfg, "summary": summary, "scraper": scraper, "out": folder / "out"}


def test_eval_loss_drops_clearly(trained):
    summary = trained["summary"]
    assert summary["status"] == "Succeeded" and summary["step"] == STEPS
    assert summary["evalLoss"] < 0.5 * summary["initialEvalLoss"]


def test_saved_adapter_moves_generations_toward_the_trained_answers(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlora_trainer.model import load_base_model

    tokenizer = AutoTokenizer.from_pretrained(trained["out"])
    pairs = {(r["question"], r["answer"]) for r in bilingual_qa_records(1)}

    def agreement(model) -> float:
        """Share of answer tokens a greedy generation gets right, position by position."""
        right = total = 0
        for question, answer in sorted(pairs):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            expected = tokenizer(answer, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=len(expected), do_sample=False)
            got = out[0, ids.shape[1]:].tolist()
            right += sum(a == b for a, b in zip(got, expected))
            total += len(expected)
        return right / total

    base = load_base_model(trained["cfg"])  # the same 4-bit base the adapter was trained on
    before = agreement(base)
    tuned = PeftModel.from_pretrained(base, trained["out"])
    after = agreement(tuned)
    assert after > before
    assert after >= 0.5


def test_outputs_are_written(trained):
    out = trained["out"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer-config.json"):
        assert (out / name).is_file(), name
    written = json.loads((out / "summary.json").read_text())
    assert written["step"] == STEPS and written["tokensTotal"] > 0 and written["truncated"] == 0
    assert written["examples"]["format"] == "qa" and written["durationSeconds"] > 0
    assert written["gpuMemoryPeakBytes"] == 0 and written["versions"]["peft"]
    assert written["lastCheckpoint"]["step"] == STEPS
    assert TrainerConfig.model_validate(json.loads((out / "trainer-config.json").read_text())) == trained["cfg"]
    # Nothing staged is left behind (checkpoints.py): only whole checkpoints and outputs.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert not (out / ".partial-outputs").exists()


def test_metrics_scraped_during_training_move_as_they_should(trained):
    scraper = trained["scraper"]
    seen = scraper.seen
    names = {name for sample in seen for name in sample}
    expected = {m.full for m in Metric if m is not Metric.PHASE}
    assert expected <= names, expected - names
    # The state set moved from loading through training to done.
    assert scraper.phases[0] == Phase.LOADING.value and scraper.phases[-1] == Phase.DONE.value
    assert Phase.TRAINING.value in scraper.phases

    def series(metric):
        return [s[metric.full] for s in seen if metric.full in s]

    steps = series(Metric.STEP)
    assert steps == sorted(steps) and steps[-1] == STEPS and len(set(steps)) > 2  # scraped mid-run, not only at the end
    tokens = series(Metric.TOKENS_TOTAL)
    assert tokens == sorted(tokens) and tokens[-1] == trained["summary"]["tokensTotal"] > tokens[0]
    assert series(Metric.TOTAL_STEPS)[-1] == STEPS
    etas = series(Metric.ETA_SECONDS)
    assert math.isnan(etas[0])  # not known before the first timed step (0 would read as "done")
    known = [v for v in etas if not math.isnan(v)]
    assert known[-1] == 0 and max(known) > 0
    assert series(Metric.LAST_CHECKPOINT_STEP)[-1] == STEPS
    assert series(Metric.TOKENS_PER_SECOND)[-1] > 0 and series(Metric.LEARNING_RATE)[-1] > 0
    assert series(Metric.GRAD_NORM)[-1] > 0 and series(Metric.EPOCH)[-1] > 1
    losses = [v for v in series(Metric.LOSS) if v > 0]  # a gauge reads 0 until the first step is logged
    assert len(set(losses)) > 2 and losses[-1] < losses[0]
    assert series(Metric.EVAL_LOSS)[-1] == pytest.approx(trained["summary"]["evalLoss"])
    assert 0 < series(Metric.START_TIME_SECONDS)[-1] <= time.time()
    assert series(Metric.GPU_MEMORY_PEAK_BYTES)[-1] == 0  # on the CPU


def test_merge_adapter_writes_a_full_model_that_answers_like_the_adapter(trained, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_trainer.output import merge_adapter

    cfg = trained["cfg"].model_copy(update={"output": trained["cfg"].output.model_copy(update={"dir": str(tmp_path)})})
    for item in trained["out"].iterdir():  # the adapter, where a mergeAdapter run would have it
        if item.is_file():
            (tmp_path / item.name).write_bytes(item.read_bytes())
    merged_dir = merge_adapter(cfg, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, trained["out"])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
