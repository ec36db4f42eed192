"""The decoder blocks trained from CUDA graphs (graphs.py) against the same blocks run eagerly, on a CUDA GPU:
the product's model path (4-bit load, LoRA, speed.configure), packed rows of several lengths. Skipped without
CUDA (they need a GPU, Flash varlen attention and bitsandbytes' CUDA kernels)."""

from __future__ import annotations

import logging
import random

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from qlora_trainer import graphs, speed  # noqa: E402
from qlora_trainer.config import TrainerConfig  # noqa: E402
from qlora_trainer.data import collator  # noqa: E402
from qlora_trainer.model import load_model  # noqa: E402
from qlora_trainer.testing import bilingual_qa_records, build_tiny_model, qa_texts, tiny_config, write_jsonl  # noqa: E402

MAX_LENGTH = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gpu-model"), qa_texts(bilingual_qa_records(1)), hidden_size=256, layers=3)


def gpu_config(model_dir, tmp_path, dropout=0.0, **training) -> TrainerConfig:
    data = write_jsonl(tmp_path / "data.jsonl", bilingual_qa_records(16))
    cfg = tiny_config(model_dir, data, tmp_path / "out", **training)
    cfg["gpus"] = 1
    cfg["quantization"]["computeDtype"] = "bfloat16"
    cfg["lora"] = {"r": 16, "alpha": 32, "dropout": dropout}  # r16: bitsandbytes buckets tensors of 4,096+
    return TrainerConfig.model_validate(cfg)


def fast_model(model_dir, tmp_path, dropout=0.0):
    """The product's model as the trainer prepares it for a packed run on this GPU."""
    cfg = gpu_config(model_dir, tmp_path, dropout)
    model, _ = load_model(cfg)
    setup = speed.configure(
        model, batch_size=4, gradient_accumulation_steps=4, max_length=MAX_LENGTH, lengths=[200] * 64,
        gradient_checkpointing=False, packing=True,
    )
    assert setup.attention == speed.VARLEN and setup.graphs is not None, setup.describe()
    model.train()
    with torch.no_grad():  # LoRA's B starts at zero, which would leave its A gradients and its forward term zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model, setup.graphs


def nudge(params):
    """An optimizer step's worth of change, in place (the graphs read the weights where they are)."""
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn_like(param), alpha=1e-2)


def packed(lengths, vocab, seed):
    """One packed row of random examples of these lengths, as the trainer's collator hands it to the GPU."""
    rng = random.Random(seed)
    examples = []
    for n in lengths:
        ids = [rng.randrange(5, vocab) for _ in range(n)]
        examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    batch = collator(None, packing=True, boundaries=True)(examples)
    return {k: (v.cuda(non_blocking=True) if hasattr(v, "cuda") else v) for k, v in batch.items()}


def loss_and_grads(model, params, batch):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, skip_logits=True, use_cache=False).loss  # as the Trainer runs it
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach().float(), grads


def relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def flat(grads):
    """All gradients as one vector (LoRA's A gradients are exactly zero while B is at its zero init)."""
    return torch.cat([g.flatten().float() for g in grads])


def both_ways(model, stack, params, batch):
    stack.enabled = True
    graphed = loss_and_grads(model, params, batch)
    stack.enabled = False
    eager = loss_and_grads(model, params, batch)
    stack.enabled = True
    return graphed, eager


def assert_same(graphed, eager, tol=2e-2):
    (loss_g, grads_g), (loss_e, grads_e) = graphed, eager
    assert abs(float(loss_g) - float(loss_e)) <= tol * abs(float(loss_e))
    assert relative_error(flat(grads_g), flat(grads_e)) < tol
    assert all(not g.any() for g, e in zip(grads_g, grads_e) if not e.any())  # zero where eager's is zero


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_graphed_blocks_give_the_eager_loss_and_gradients_at_every_size(model_dir, tmp_path):
    model, stack = fast_model(model_dir, tmp_path)
    params = trainable(model)
    vocab = model.config.vocab_size
    rows = [[300, 200, 180], [500, 400, 90, 300], [250, 260, 170], [60] * 20, [512]]
    for seed, lengths in enumerate(rows):
        assert_same(*both_ways(model, stack, params, packed(lengths, vocab, seed)))
        nudge(params)
    # 680, 1290, 680 (other data, the first capture again), 1200 tokens in 20 sequences (more boundary slots), 512.
    assert stack.stats.replayed == len(rows)
    assert stack.stats.captured == 4
    assert stack.stats.eager == len(rows)  # the eager halves of the comparison
    assert 0 < stack.stats.padding_fraction < 0.5


def test_graphed_backward_adds_to_gradients_already_there(model_dir, tmp_path):
    model, stack = fast_model(model_dir, tmp_path)
    params = trainable(model)
    first, second = packed([300, 220], model.config.vocab_size, 1), packed([400, 100, 90], model.config.vocab_size, 2)
    stack.enabled = False
    expected = [a + b for a, b in zip(loss_and_grads(model, params, first)[1], loss_and_grads(model, params, second)[1])]
    stack.enabled = True
    for batch in (first, second):  # two micro-batches of one optimizer step, no zero_grad between
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**batch, skip_logits=True, use_cache=False).loss.backward()
    assert relative_error(flat([p.grad for p in params]), flat(expected)) < 2e-2
    assert stack.stats.replayed == 2
    # An eager micro-batch's gradient first, then a graphed one: the graph adds to it.
    for p in params:
        p.grad = None
    stack.enabled = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**first, skip_logits=True, use_cache=False).loss.backward()
    stack.enabled = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**second, skip_logits=True, use_cache=False).loss.backward()
    assert relative_error(flat([p.grad for p in params]), flat(expected)) < 2e-2


def test_a_second_forward_before_the_backward_runs_eagerly_and_both_backwards_are_right(model_dir, tmp_path):
    model, stack = fast_model(model_dir, tmp_path)
    params = trainable(model)
    first, second = packed([300, 220], model.config.vocab_size, 6), packed([260, 250], model.config.vocab_size, 7)
    stack.enabled = False
    expected = [a + b for a, b in zip(loss_and_grads(model, params, first)[1], loss_and_grads(model, params, second)[1])]
    stack.enabled = True
    loss_and_grads(model, params, first)  # the padded size captured
    with torch.autocast("cuda", dtype=torch.bfloat16):
        both = model(**first, skip_logits=True, use_cache=False).loss + model(**second, skip_logits=True, use_cache=False).loss
    both.backward()
    assert relative_error(flat([p.grad for p in params]), flat(expected)) < 2e-2
    assert stack.stats.refusals == {"a second forward before the first one's backward": 1}


def test_each_replay_draws_its_own_dropout(model_dir, tmp_path):
    model, stack = fast_model(model_dir, tmp_path, dropout=0.3)
    params = trainable(model)
    batch = packed([300, 200], model.config.vocab_size, 3)
    first = loss_and_grads(model, params, batch)
    second = loss_and_grads(model, params, batch)
    assert stack.stats.replayed == 2 and stack.stats.captured == 1
    assert relative_error(flat(first[1]), flat(second[1])) > 1e-2  # other masks, other gradients


def test_moved_parameters_drop_the_graphs_and_the_next_step_is_right(model_dir, tmp_path):
    import bitsandbytes as bnb

    model, stack = fast_model(model_dir, tmp_path)
    params = trainable(model)
    batch = packed([300, 200, 100], model.config.vocab_size, 4)
    assert_same(*both_ways(model, stack, params, batch))
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-3)
    assert speed.bucket_optimizer_parameters(optimizer)  # the LoRA weights become views into one bucket
    assert_same(*both_ways(model, stack, params, batch))
    assert stack.stats.dropped == 1 and stack.stats.captured == 2


def test_evaluation_runs_the_blocks_eagerly(model_dir, tmp_path):
    model, stack = fast_model(model_dir, tmp_path)
    batch = packed([300, 200], model.config.vocab_size, 5)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(**batch, skip_logits=True, use_cache=False)
    assert stack.stats.replayed == 0 and stack.stats.captured == 0 and stack.stats.eager == 0


def test_a_training_run_learns_with_the_graphs(model_dir, tmp_path, caplog):
    from qlora_trainer.training import train

    cfg = gpu_config(model_dir, tmp_path, maxSteps=40, batchSize=4, gradientAccumulationSteps=2, maxLength=MAX_LENGTH,
                     learningRate=5e-3, checkpointEvery=100, evalEvery=40, optimizer="paged_adamw_8bit")
    with caplog.at_level(logging.INFO):
        summary = train(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert any("trained from CUDA graphs" in m for m in messages), messages
    stats = [m for m in messages if m.startswith("CUDA graphs: ") and "replayed" in m]
    assert stats and not stats[-1].startswith("CUDA graphs: 0 micro-batches"), stats
    assert "0 training calls eager" in stats[-1], stats
    assert summary["status"] == "Succeeded"
    assert summary["evalLoss"] < 0.8 * summary["initialEvalLoss"], summary
