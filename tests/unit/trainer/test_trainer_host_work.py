"""QLoRATrainer leaves out the Trainer's per-step walks over the whole model (what a host-bound GPU step waits
for) and updates the LoRA weights in one optimizer bucket without changing what a step does: FLOPs still counted,
gradients clipped the same and cleared after every step, dropout on in every training step and off in every
evaluation, the same weights as the per-tensor optimizer, resumes from either kind of checkpoint. A tiny fp32
Llama with LoRA on the CPU; timings live in bench/."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qlora_trainer.data import collator  # noqa: E402
from qlora_trainer.training import QLoRATrainer  # noqa: E402

STEPS = 4


def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def examples(n: int):
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(5, 64, (6 + i % 5,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


def trainer_for(model, tmp_path, **overrides):
    from transformers import PrinterCallback, TrainingArguments

    args = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], remove_unused_columns=False,
        disable_tqdm=True, use_cpu=True, max_grad_norm=0.3, seed=0,
    )
    args.update(overrides)
    trainer = QLoRATrainer(
        model=model, args=TrainingArguments(**args), train_dataset=examples(32), eval_dataset=examples(8),
        data_collator=collator(None, packing=True), token_budget=24,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def test_parameters_are_counted_once_and_the_flops_estimate_is_the_trainers(tmp_path, monkeypatch):
    model = lora_model()
    params = model.num_parameters(exclude_embeddings=True)
    calls = []
    base = type(model.get_base_model())  # the peft model hands num_parameters on to the base model
    original = base.num_parameters
    monkeypatch.setattr(base, "num_parameters", lambda self, **kw: calls.append(kw) or original(self, **kw))
    tokens = []
    trainer = trainer_for(model, tmp_path)
    real_step = QLoRATrainer.training_step

    def counting_step(self, model, inputs, num_items_in_batch=None):
        tokens.append(inputs["input_ids"].numel())
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(QLoRATrainer, "training_step", counting_step)
    trainer.train()
    assert len([c for c in calls if c == {"exclude_embeddings": True}]) == 1
    assert trainer.state.total_flos == pytest.approx(6 * params * sum(tokens))


def test_gradients_are_clipped_over_the_trainable_parameters_only(tmp_path, monkeypatch):
    model = lora_model()
    trainer = trainer_for(model, tmp_path)
    seen = []
    real_clip = trainer.accelerator.clip_grad_norm_

    def recording_clip(parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        seen.append(parameters)
        full = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        norm = real_clip(parameters, max_norm, norm_type)
        assert float(norm) == pytest.approx(float(full), rel=1e-5)  # frozen weights have no gradient to add
        return norm

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", recording_clip)
    trainer.train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == STEPS
    assert all({id(p) for p in params} == trainable for params in seen)


def test_dropout_is_on_in_every_training_step_and_off_in_every_evaluation(tmp_path):
    model = lora_model()
    dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    states = []
    dropout.register_forward_pre_hook(lambda module, args: states.append((torch.is_grad_enabled(), module.training)))
    walks = []
    real_train = type(dropout).train
    dropout.train = lambda mode=True: walks.append(mode) or real_train(dropout, mode)
    trainer = trainer_for(model, tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    trainer.train()
    training = [on for grad, on in states if grad]
    evaluating = [on for grad, on in states if not grad]
    assert training and all(training)
    assert evaluating and not any(evaluating)
    # One walk into training mode at the start and one after each evaluation that training follows, not one
    # a step (the last evaluation comes after the last step).
    resumed = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] < STEPS]
    assert resumed and walks.count(True) == 1 + len(resumed)
    assert "train" not in vars(model)  # the stand-in is gone after each step


def test_a_step_still_learns(tmp_path):
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer_for(model, tmp_path).train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and len(changed) == len(before)


def test_gradients_are_cleared_after_every_step_without_walking_the_model(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    model = lora_model()
    walks = []
    real_zero_grad = torch.nn.Module.zero_grad
    walk = lambda self, *a, **k: walks.append(self) or real_zero_grad(self, *a, **k)  # noqa: E731
    monkeypatch.setattr(torch.nn.Module, "zero_grad", walk)
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = []

    class Grads(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(("begin", sum(p.grad is not None for p in trainable)))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append(("optimizer", sum(p.grad is not None for p in trainable)))

    trainer = trainer_for(model, tmp_path)
    trainer.add_callback(Grads())
    trainer.train()
    assert seen == [("begin", 0), ("optimizer", len(trainable))] * STEPS
    assert walks == []  # the Trainer's zero_grad calls went to the lean one
    assert "zero_grad" not in vars(model)  # and it is gone after training
    model.zero_grad()
    assert walks == [model]


def wide_lora_model():
    """LoRA tensors large enough for 8-bit optimizer states (bitsandbytes keeps those under 4,096 in 32 bits)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=256,
        vocab_size=64, max_position_embeddings=128,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(LlamaForCausalLM(config), lora)


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bucketed_optimizer_trains_and_resumes_as_the_plain_one(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from qlora_trainer import speed

    plain_model = wide_lora_model()
    with monkeypatch.context() as m:
        m.setattr(speed, "bucket_optimizer_parameters", lambda optimizer: [])
        trainer_for(plain_model, tmp_path / "plain", optim="adamw_8bit", save_strategy="steps", save_steps=2).train()
    made = []
    real = speed.bucket_optimizer_parameters
    monkeypatch.setattr(speed, "bucket_optimizer_parameters", lambda optimizer: made.extend(real(optimizer)) or made)
    model = wide_lora_model()
    trainer = trainer_for(model, tmp_path / "bucketed", optim="adamw_8bit", save_strategy="steps", save_steps=2)
    trainer.train()
    assert [len(b.members) for b in made] == [8]  # A and B of q and v in two blocks, 4,096 elements each
    expected = lora_weights(plain_model)
    assert all(torch.equal(p, expected[n]) for n, p in lora_weights(model).items())

    # Resumed from the step-2 checkpoint (adapter, bucketed optimizer state), it ends where the others did.
    made.clear()
    resumed = wide_lora_model()
    trainer_for(resumed, tmp_path / "resumed", optim="adamw_8bit").train(
        resume_from_checkpoint=str(tmp_path / "bucketed" / "out" / "checkpoint-2")
    )
    assert made
    assert all(torch.allclose(p, expected[n], atol=1e-6) for n, p in lora_weights(resumed).items())

    # From a checkpoint of one state per tensor (written before buckets): the buckets are split, and it ends there too.
    made.clear()
    upgraded = wide_lora_model()
    trainer = trainer_for(upgraded, tmp_path / "upgraded", optim="adamw_8bit")
    trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "out" / "checkpoint-2"))
    assert made and trainer.optimizer.optimizer._qlora_buckets == []
    assert all(torch.allclose(p, expected[n], atol=1e-6) for n, p in lora_weights(upgraded).items())


def test_no_buckets_under_the_fp16_gradient_scaler(tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = trainer_for(wide_lora_model(), tmp_path, optim="adamw_8bit")
    # fp16 needs a GPU here; the scaler is what the choice depends on (it unscales the groups' gradients).
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    optimizer = trainer.create_optimizer()
    assert not getattr(optimizer, "_qlora_buckets", None)
    assert len(optimizer.param_groups[0]["params"]) == 8  # A and B of q and v in two blocks, one by one


def test_eval_loss_is_the_mean_over_every_answer_token_not_the_mean_of_batch_means(tmp_path):
    """Batches of very different lengths: one long example alone, then short ones; each token counts once."""
    model = lora_model()
    generator = torch.Generator().manual_seed(2)

    def row(length, answer):
        ids = torch.randint(5, 64, (length,), generator=generator).tolist()
        return {"input_ids": ids, "labels": [-100] * (length - answer) + ids[length - answer:]}

    evals = [row(60, 50), row(8, 2), row(8, 2), row(8, 2)]
    trainer = trainer_for(model, tmp_path, per_device_eval_batch_size=1)
    trainer.eval_dataset = evals
    got = trainer.evaluate()["eval_loss"]

    model.eval()
    total = tokens = 0.0
    means = []
    with torch.no_grad():
        for example in evals:
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
            loss = float(model(input_ids=ids, labels=labels).loss)
            count = int((labels[:, 1:] != -100).sum())
            total, tokens = total + loss * count, tokens + count
            means.append(loss)
    assert got == pytest.approx(total / tokens, rel=1e-5)
    assert abs(got - sum(means) / len(means)) > 1e-3  # the two differ here, so the test tells them apart
