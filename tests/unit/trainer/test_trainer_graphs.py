"""CUDA graphs of the decoder blocks (graphs.py), the parts that run anywhere: how a micro-batch is padded, how
a blocks call's arguments map onto static inputs, and that installing the graphs leaves a model's loop, state
dict and results as they were where no graph can run (the CPU). The graphs themselves: tests/gpu."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer import graphs


@pytest.mark.parametrize(
    ("tokens", "limit", "expected"),
    [
        (1, 16384, 512),
        (512, 16384, 512),
        (513, 16384, 1024),
        (5417, 16384, 5632),
        (16000, 16384, 16384),  # the budget caps the rounding
        (16384, 16384, 16384),
        (17000, 16384, 17000),  # one example over the budget runs at its own length
    ],
)
def test_micro_batches_are_padded_to_the_granularity_within_the_budget(tokens, limit, expected):
    assert graphs.padded_tokens(tokens, 512, limit) == expected


@pytest.mark.parametrize(("sequences", "slots"), [(1, 8), (7, 8), (8, 16), (16, 24), (23, 24), (24, 32)])
def test_boundaries_keep_a_slot_for_the_padding_sequence(sequences, slots):
    assert graphs.boundary_slots(sequences) == slots
    assert graphs.boundary_slots(sequences) >= sequences + 1


def call_kwargs(tokens=10):
    cos, sin = torch.ones(1, tokens, 16), torch.zeros(1, tokens, 16)
    return {
        "attention_mask": None,
        "position_embeddings": (cos, sin),
        "position_ids": torch.arange(tokens)[None],
        "cache": None,
        "use_cache": False,
        "cu_seq_lens_q": torch.tensor([0, 4, tokens], dtype=torch.int32),
        "cu_seq_lens_k": torch.tensor([0, 4, tokens], dtype=torch.int32),
        "max_length_q": 6,
        "max_length_k": 6,
        "num_items_in_batch": torch.tensor(7),
    }


def test_arguments_sort_into_per_token_boundaries_lengths_statics_and_constants():
    args = graphs.Arguments.of(call_kwargs(), 10)
    assert args.per_token == (("position_embeddings", 0), ("position_embeddings", 1), ("position_ids", -1))
    assert args.boundaries == ("cu_seq_lens_k", "cu_seq_lens_q")
    assert args.lengths == ("max_length_k", "max_length_q")
    assert args.statics == ("num_items_in_batch",)
    assert dict(args.constants) == {"attention_mask": None, "cache": None, "use_cache": False}
    # The key's layout: dtypes and the shapes past the tokens (so another length is the same layout).
    assert graphs.Arguments.of(call_kwargs(30), 30).layout == args.layout


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"attention_mask": torch.ones(1, 10)}, "a padding mask"),
        ({"cu_seq_lens_q": [0, 4, 10]}, "cu_seq_lens_q is not a tensor"),
        ({"bias": torch.zeros(4, 10)}, "bias: a tensor of the row's length in another dimension"),
        ({"hook": object()}, "hook: a object"),
        ({"max_length_q": torch.tensor(6)}, "max_length_q is not an int"),
    ],
)
def test_arguments_a_graph_cannot_take_are_refused_with_the_reason(change, reason):
    kwargs = {**call_kwargs(), **change}
    with pytest.raises(graphs.Refused, match=reason):
        graphs.Arguments.of(kwargs, 10)


def test_boundaries_are_required():
    kwargs = call_kwargs()
    del kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    with pytest.raises(graphs.Refused, match="no sequence boundaries"):
        graphs.Arguments.of(kwargs, 10)


def test_stats_describe_what_ran():
    stats = graphs.GraphStats(captured=3, replayed=40, eager=2, tokens=900, padded_tokens=1000,
                              refusals={"a padding mask": 2})
    assert stats.padding_fraction == pytest.approx(0.1)
    assert stats.describe() == (
        "40 micro-batches replayed, 3 sizes captured, 10.0% of their tokens padding, 2 training calls eager "
        "(a padding mask: 2)"
    )


@pytest.fixture()
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    return model


def packed_batch(vocab: int):
    from qlora_trainer.data import collator

    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 12, 5):
        ids = torch.randint(5, vocab, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    return collator(None, packing=True, boundaries=True)(examples)


def step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_installed_graphs_take_the_stacks_loop_only_while_training(lora_model):
    layers = lora_model.get_base_model().model.layers
    keys = list(lora_model.state_dict())
    stack = graphs.install(lora_model.get_base_model(), max_length=64, limit=128)
    assert stack is not None and graphs.installed(lora_model) is stack
    assert graphs.install(lora_model.get_base_model(), max_length=64, limit=128) is stack  # once per stack
    assert len(stack.params) == 2 * 2 * len(layers)  # A and B of q and v in each block
    assert layers[:] == [stack]
    assert list(layers[:1]) == [layers[0]]  # a part of the stack is the blocks themselves
    with torch.no_grad():
        assert list(layers[:]) == list(layers)
    lora_model.eval()
    assert list(layers[:]) == list(layers)
    assert list(lora_model.state_dict()) == keys
    assert graphs.uninstall(lora_model) == 1
    assert type(layers) is torch.nn.ModuleList and graphs.installed(lora_model) is None


def test_off_cuda_the_installed_stack_runs_the_blocks_as_before(lora_model):
    batch = packed_batch(lora_model.config.vocab_size)
    plain = step(lora_model, batch)
    stack = graphs.install(lora_model.get_base_model(), max_length=64, limit=128)
    installed = step(lora_model, batch)
    assert torch.equal(plain[0], installed[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], installed[1]))
    assert stack.stats.eager == 1 and stack.stats.replayed == 0
    assert stack.stats.refusals == {"not one packed row on a CUDA device": 1}


@pytest.mark.parametrize(
    ("env", "wanted"),
    [({}, True), ({"QLORA_CUDA_GRAPHS": "1"}, True), ({"QLORA_CUDA_GRAPHS": "0"}, False),
     ({"QLORA_CUDA_GRAPHS": " off "}, False), ({"QLORA_CUDA_GRAPHS": "false"}, False)],
)
def test_the_environment_can_turn_the_graphs_off(env, wanted):
    from qlora_trainer.training import cuda_graphs_wanted

    assert cuda_graphs_wanted(env) is wanted


def test_graphs_fit_plans_without_recomputation_that_leave_room_for_them():
    from qlora_trainer import speed

    shape = speed.ModelShape(hidden_size=2560, num_layers=30, num_heads=32, num_kv_heads=8, head_dim=80,
                             intermediate_size=7168, vocab_size=102400)
    gib = speed.GIB

    def plan(peak, budget, checkpointed=0):
        return speed.BatchPlan(
            micro_batch=16, accumulation_steps=1, token_budget=16384, packed=True, checkpointed_layers=checkpointed,
            num_layers=30, worst_case_tokens=16384, dense_weights=True, estimated_peak_bytes=int(peak * gib),
            budget_bytes=int(budget * gib), reason="test",
        )

    assert speed.cuda_graphs_fit(plan(45.0, 133.5), shape)  # the defaults on an H200
    assert not speed.cuda_graphs_fit(plan(21.7, 23.9), shape)  # a plan that just fits 24 GiB
    assert not speed.cuda_graphs_fit(plan(10.0, 133.5, checkpointed=4), shape)  # recomputed blocks


def test_a_plan_with_the_graphs_counts_their_memory_in_its_peak():
    from qlora_trainer import speed

    shape = speed.ModelShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             intermediate_size=14336, vocab_size=102400)
    plan = speed.BatchPlan(
        micro_batch=16, accumulation_steps=1, token_budget=16384, packed=True, checkpointed_layers=0, num_layers=32,
        worst_case_tokens=16384, dense_weights=False, estimated_peak_bytes=int(71.7 * speed.GIB),
        budget_bytes=int(136.8 * speed.GIB), reason="largest modelled throughput that fits",
    )
    graphed = speed.with_graphs(plan, shape)
    added = graphed.estimated_peak_bytes - plan.estimated_peak_bytes
    assert added == speed.graphs_bytes(plan, shape) > 0.1 * plan.estimated_peak_bytes
    assert "CUDA graphs' memory included" in graphed.describe()
    # The 7.8B defaults measured 76.3 GiB at this worst case (H200, 2026-12-04): the estimate is not below it.
    assert graphed.estimated_peak_bytes / speed.GIB >= 76.3
