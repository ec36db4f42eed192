"""The pure parts of the trainer's GPU fast path (qlora_trainer.speed): FLOPs and MFU arithmetic, the
`batchSize: auto` planner, and the clean CPU fallbacks of everything CUDA-only. Timings live in bench/."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qlora_trainer import speed

GIB = speed.GIB
EXAONE = speed.ModelShape(
    hidden_size=2560, num_layers=30, num_heads=32, num_kv_heads=8, head_dim=80, intermediate_size=7168, vocab_size=102400
)


def plan(budget_gib: float, **kw) -> speed.BatchPlan:
    args = dict(
        optimizer_batch=16,
        max_length=1024,
        mean_length=350.0,
        budget_bytes=int(budget_gib * GIB),
        model_bytes=int(1.55 * GIB),
        shape=EXAONE,
        fused_loss=True,
    )
    args.update(kw)
    return speed.plan_batch(**args)


# --- shape, FLOPs, MFU -------------------------------------------------------------------------------------------


def test_shape_from_a_llama_style_config():
    config = SimpleNamespace(
        hidden_size=2560, num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=8, head_dim=80,
        intermediate_size=7168, vocab_size=102400,
    )
    assert speed.ModelShape.from_config(config) == EXAONE


def test_shape_head_dim_and_kv_heads_default_from_hidden_size():
    config = SimpleNamespace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    shape = speed.ModelShape.from_config(config)
    assert (shape.head_dim, shape.num_kv_heads) == (16, 4)


def test_exaone_parameter_counts():
    # Per block: q and o 2560x2560, k and v 2560x640, three MLP matrices 2560x7168; plus the tied output head.
    per_block = 2 * 2560 * 2560 + 2 * 2560 * 640 + 3 * 2560 * 7168
    assert EXAONE.matmul_params == 30 * per_block + 102400 * 2560
    # r=16 on q, k, v, o: r * (in + out) each; the count peft reported on the GPU run.
    assert EXAONE.lora_params(16) == 7_987_200
    assert EXAONE.lora_params(16, "all-linear") > EXAONE.lora_params(16)


def test_flops_per_token_adds_frozen_lora_and_attention_terms():
    lengths = [100, 300]
    context = (100**2 + 300**2) / 400
    expected = 4 * EXAONE.matmul_params + 6 * 1000 + 6 * 30 * 32 * 80 * context
    assert speed.flops_per_token(EXAONE, 1000, lengths) == pytest.approx(expected)
    assert speed.attention_context([]) == 0.0


def test_mfu_is_model_flops_over_peak():
    assert speed.mfu(1000.0, 1e9, peak_flops=1e13) == pytest.approx(0.1)
    assert speed.mfu(30_000, speed.flops_per_token(EXAONE, EXAONE.lora_params(16), [300] * 10)) == pytest.approx(
        30_000 * (4 * EXAONE.matmul_params + 6 * EXAONE.lora_params(16) + 6 * 30 * 2560 * 300) / 989e12
    )


# --- batchSize: auto ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [3, 5, 8, 12, 16, 24, 40, 80, 140])
def test_plan_fits_its_budget_and_keeps_the_optimizer_batch(budget):
    p = plan(budget, dense_weight_bytes=int(4.28e9))
    assert p.estimated_peak_bytes <= budget * GIB
    assert p.optimizer_batch == 16
    assert p.token_budget >= 1024 and p.token_budget % 1024 == 0
    assert 0 <= p.checkpointed_layers <= 30
    assert p.describe().startswith("optimizer batch 16 packed")


def test_a_large_card_recomputes_nothing_and_a_small_one_checkpoints():
    big, small = plan(80), plan(5)
    assert not big.gradient_checkpointing
    assert small.gradient_checkpointing
    assert small.token_budget < big.token_budget


def test_more_memory_never_means_more_recomputation():
    counts = [plan(g).checkpointed_layers for g in (4, 6, 8, 12, 16, 24, 32, 48, 80)]
    assert counts == sorted(counts, reverse=True)


def test_weight_cache_only_where_room_is_left():
    assert plan(80, dense_weight_bytes=int(4.28e9)).dense_weights
    assert not plan(5, dense_weight_bytes=int(4.28e9)).dense_weights
    assert not plan(80, dense_weight_bytes=0).dense_weights


def test_nothing_fits_gives_the_smallest_plan_and_says_so():
    p = plan(1.0)
    assert p.token_budget == 1024 and p.checkpointed_layers == 30
    assert "nothing fits" in p.reason


def test_padded_plans_use_divisors_of_the_optimizer_batch():
    p = plan(24, packed=False)
    assert 16 % p.micro_batch == 0
    assert p.micro_batch * p.accumulation_steps == 16
    assert p.describe().startswith(f"micro-batch {p.micro_batch} x accumulation")


def test_unfused_loss_needs_more_memory_per_token():
    fused = speed.MemoryModel().per_token(EXAONE, 0.0, fused_loss=True)
    unfused = speed.MemoryModel().per_token(EXAONE, 0.0, fused_loss=False)
    assert unfused > fused + 1e6  # the fp32 logits of a 102k vocabulary
    assert plan(24, fused_loss=False).token_budget <= plan(24).token_budget


def test_a_blocks_memory_grows_with_the_mlps_width_too():
    memory = speed.MemoryModel()
    wide = speed.ModelShape(
        hidden_size=2560, num_layers=30, num_heads=32, num_kv_heads=8, head_dim=80, intermediate_size=14336, vocab_size=102400
    )
    extra = memory.per_token(wide, 0.0, fused_loss=True) - memory.per_token(EXAONE, 0.0, fused_loss=True)
    assert extra == pytest.approx(30 * memory.layer_bytes_per_intermediate * (14336 - 7168))
    # A recomputed block's backward holds part of a block beyond what is kept; no recomputation, none of it.
    everything = memory.per_token(EXAONE, 1.0, fused_loss=True)
    assert everything > 30 * memory.boundary_bytes_per_hidden * 2560 + memory.head_bytes_fused


def test_bad_plan_arguments_are_refused():
    with pytest.raises(ValueError):
        plan(24, optimizer_batch=0)


def test_training_arguments_leave_checkpointing_to_the_plan():
    overrides = speed.training_arguments_overrides(plan(5))
    assert overrides["gradient_checkpointing"] is False
    assert overrides["per_device_train_batch_size"] == 16


def test_compile_pays_only_for_long_runs():
    assert not speed.compile_pays(119)
    assert speed.compile_pays(5000)


# --- CPU fallbacks -----------------------------------------------------------------------------------------------


def tiny_llama(attention: str = "sdpa"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=128,
    )
    config._attn_implementation = attention
    return LlamaForCausalLM(config)


def test_cpu_gets_sdpa_and_no_kernels():
    model = tiny_llama()
    assert speed.choose_attention("cpu") == "sdpa"
    assert speed.apply_kernels(model) == []
    assert speed.dense_weight_bytes(model) == 0
    assert speed.cache_dequantized_weights(model) == 0
    assert speed.compile_layers(model) == 0


def test_lean_preparation_freezes_without_upcasting_and_checkpoints_the_first_blocks():
    import torch

    model = tiny_llama().to(torch.bfloat16)
    speed.prepare_for_kbit_training_lean(model, checkpointed_layers=1)
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert [layer.gradient_checkpointing for layer in speed.decoder_layers(model)] == [True, False]
    off = speed.prepare_for_kbit_training_lean(tiny_llama(), checkpointed_layers=0)
    assert not any(layer.gradient_checkpointing for layer in speed.decoder_layers(off))


def test_native_rms_norm_computes_the_llama_norm_and_leaves_other_norms_alone():
    import torch

    class OnePlusWeightRMSNorm(torch.nn.Module):  # Gemma's arithmetic: x / rms * (1 + weight)
        def __init__(self, size):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(size))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = tiny_llama().to(torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
    model.add_module("other_norm", OnePlusWeightRMSNorm(32))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    assert speed.use_native_rms_norm(model) == 2 * 2 + 1  # two per block, one final
    assert "forward" not in vars(model.other_norm)
    speed.prepare_for_kbit_training_lean(model, 0)
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert torch.allclose(out.logits.float(), before, rtol=0.05, atol=0.05)
    assert embeddings.weight.grad is not None and model.model.norm.weight.grad is None


def lora_llama(dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_llama().to(torch.bfloat16)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter has not
            torch.nn.init.normal_(param, std=0.1)
    return model


def loss_and_grads(model, ids, autocast: bool, seed: int = 1):
    import torch

    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout draw for every run
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_computes_what_peft_computes(dropout):
    import copy

    import torch

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model = lora_llama(dropout)
    exact = copy.deepcopy(model).float()
    _, truth = loss_and_grads(exact, ids, autocast=False)
    peft_loss, peft_grads = loss_and_grads(model, ids, autocast=True)
    assert speed.use_lean_lora(model) == 2 * 4
    lean_loss, lean_grads = loss_and_grads(model, ids, autocast=True)

    def error(grads):
        flat = lambda g: torch.cat([g[n].flatten() for n in truth])  # noqa: E731
        return float((flat(grads) - flat(truth)).norm() / flat(truth).norm())

    # bf16 rounding either way (a few per cent): the lean forward is about as close to the fp32 arithmetic as
    # peft's own; a wrong scaling, a missing dropout mask or a lost gradient would be off by tens of per cent.
    assert lean_loss == pytest.approx(peft_loss, rel=1e-3)
    assert error(peft_grads) < 0.05
    assert error(lean_grads) <= 2 * error(peft_grads) + 0.01


def test_lean_lora_leaves_every_other_state_to_peft():
    import torch

    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    model = lora_llama(0.1).eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits  # no autocast: peft's own forward, before and after
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    speed.use_lean_lora(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)
        with model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.allclose(model(input_ids=ids).logits.float(), base.float(), atol=0.05)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base)
    assert speed.use_lean_lora(model) == 0  # once per layer


def test_fused_projections_compute_what_each_layer_computes(monkeypatch):
    import torch

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model = lora_llama(0.1)
    speed.use_lean_lora(model)
    own_loss, own_grads = loss_and_grads(model, ids, autocast=True)
    attention = model.base_model.model.model.layers[0].self_attn
    assert speed.fuse_projections(model) == 2  # one group per block
    assert speed.fuse_projections(model) == 0  # once
    fused = attention.q_proj._qlora_group.weight
    assert fused.shape == (32 + 16 + 16, 32)
    assert attention.k_proj.base_layer.weight.data_ptr() == fused[32:].data_ptr()  # a view: no memory added

    computed = []
    compute = speed._ProjectionGroup.compute
    monkeypatch.setattr(speed._ProjectionGroup, "compute", lambda self, x: computed.append(1) or compute(self, x))
    fused_loss, fused_grads = loss_and_grads(model, ids, autocast=True)
    assert len(computed) == 2  # q computed k and v with it, in each of the two blocks
    assert not attention.q_proj._qlora_group.pending  # every output was taken
    # The same products and the same dropout draws (members draw in their own order): equal up to the rounding
    # of one matmul instead of three.
    assert fused_loss == pytest.approx(own_loss, rel=1e-3)
    for name, grad in own_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=0.02, atol=1e-3), name


def test_fused_projections_leave_other_states_and_inputs_to_each_layer():
    import torch

    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    model = lora_llama(0.1).eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    speed.fuse_projections(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)  # no autocast: peft's forward, layer by layer
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 3, 32, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = attention.q_proj(x)
        x.add_(1.0)  # changed in place after q computed k and v: k must not get the stale output
        k = attention.k_proj(x)
        assert torch.allclose(k.float(), type(attention.k_proj).forward(attention.k_proj, x).float(), atol=1e-2)
        assert q.shape == (1, 3, 32) and k.shape == (1, 3, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.randn(1, 3, 32, dtype=torch.bfloat16)  # an inference tensor keeps no version: each layer alone
        assert torch.equal(attention.v_proj(y), type(attention.v_proj).forward(attention.v_proj, y))
        assert attention.q_proj._qlora_group.input is not y  # nothing computed for the others
    assert speed.drop_dequantized_weights(model) == 0  # no 4-bit layers here; the groups are undone
    assert not hasattr(attention.q_proj, "_qlora_group") and "forward" not in attention.q_proj.__dict__


def test_optimizer_updates_are_waited_for_only_where_something_runs_out_of_order():
    assert not speed.optimizer_sync_needed("cuda", paged_tensors=0, stream=0)
    assert speed.optimizer_sync_needed("cuda", paged_tensors=2, stream=0)  # unified memory migrates on its own
    assert speed.optimizer_sync_needed("cuda", paged_tensors=0, stream=94_000_000)  # the caller's side stream
    assert speed.optimizer_sync_needed("xpu", paged_tensors=0, stream=None)


def test_dropping_optimizer_syncs_keeps_bitsandbytes_own_for_the_rest(monkeypatch):
    import torch

    bnb_optimizer = pytest.importorskip("bitsandbytes.optim.optimizer")
    calls = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: calls.append(t))
    assert speed.drop_optimizer_syncs() and speed.drop_optimizer_syncs()  # once: the second call keeps the first
    assert bnb_optimizer.sync_gpu._qlora_original is not None
    cpu = torch.zeros(1)
    bnb_optimizer.sync_gpu(cpu)
    assert calls == [cpu]  # not CUDA: bitsandbytes' own call, whatever it does there


def test_packed_boundaries_from_restarting_positions():
    import torch

    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    cu, longest = speed.packed_boundaries(positions)
    assert cu.tolist() == [0, 3, 5, 6] and longest == 3
    assert speed.packed_boundaries(positions)[0] is cu  # once per forward: the same tensor hits the cache


def test_boundaries_hook_is_installed_once_on_the_decoder_stack():
    model = tiny_llama()
    assert speed.install_packed_boundaries(model) == 1
    assert speed.install_packed_boundaries(model) == 0


def test_varlen_attention_on_the_cpu_is_sdpa_with_the_padding_mask():
    import torch

    speed.register_varlen_attention()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1, training=False)
    out, _ = speed.varlen_attention_forward(module, q, k, v, mask, scaling=8**-0.5)
    for row, n in enumerate((5, 3)):
        ref = torch.nn.functional.scaled_dot_product_attention(q[row : row + 1, :, :n], k[row : row + 1, :, :n], v[row : row + 1, :, :n], is_causal=True)
        assert torch.allclose(out[row, :n], ref[0].transpose(0, 1), atol=1e-5)


def test_allocator_env_keeps_a_users_choice():
    env: dict[str, str] = {}
    assert speed.allocator_env(env)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert speed.allocator_env(env)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_configure_is_a_no_op_on_the_cpu():
    model = tiny_llama()
    setup = speed.configure(
        model, batch_size="auto", gradient_accumulation_steps=8, max_length=64, lengths=[10, 20],
        gradient_checkpointing=True, packing=True, total_steps=10_000,
    )
    assert (setup.attention, setup.kernels, setup.plan, setup.token_budget) == ("sdpa", [], None, None)
    assert not setup.owns_checkpointing
    assert setup.to_dict()["plan"] is None
    assert "attention sdpa" in setup.describe()


def test_setup_reports_the_plan_it_made():
    packed = speed.SpeedSetup(attention="varlen", kernels=["rms_norm"], plan=plan(24))
    assert packed.owns_checkpointing and packed.token_budget == packed.plan.token_budget
    assert packed.padded_batch is None
    padded = speed.SpeedSetup(attention="sdpa", kernels=[], plan=plan(24, packed=False))
    assert padded.padded_batch == (padded.plan.micro_batch, padded.plan.accumulation_steps)
    assert padded.to_dict()["plan"]["packed"] is False


def bucket_case(shapes, optimizer_cls, **kwargs):
    """The same parameters twice over, under one optimizer each: the first as they are, the second bucketed."""
    import torch

    torch.manual_seed(0)
    values = [torch.randn(shape) * 0.1 for shape in shapes]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    bucketed = [torch.nn.Parameter(v.clone()) for v in values]
    opts = [optimizer_cls(ps, lr=1e-2, weight_decay=0.1, **kwargs) for ps in (plain, bucketed)]
    return plain, bucketed, opts


def step_alike(pairs, grads):
    """One step of each (parameters, optimizer) pair with the same gradients (None: no gradient), then
    zero_grad; asserts every gradient is gone after it, the bucket members' too."""
    for ps, opt in pairs:
        for p, g in zip(ps, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit", "AdamW"])
def test_bucketed_parameters_get_the_updates_they_would_get_alone(optimizer):
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    # Three take part (multiples of 256, from min_8bit_size); the small one and the 300-element one stay alone.
    shapes = [(16, 512), (512, 16), (16, 256), (8, 8), (300,)]
    plain, bucketed, (plain_opt, bucketed_opt) = bucket_case(shapes, getattr(bnb.optim, optimizer))
    buckets = speed.bucket_optimizer_parameters(bucketed_opt)
    assert [len(b.members) for b in buckets] == [3]
    assert buckets[0].members == bucketed[:3] and buckets[0].flat.numel() == 8192 + 8192 + 4096
    assert bucketed[1].data_ptr() == buckets[0].flat.data_ptr() + 8192 * 4  # a view: nothing copied per step
    assert len(bucketed_opt.param_groups[0]["params"]) == 3  # the bucket and the two left alone
    for step in range(6):
        grads = [torch.randn(shape) for shape in shapes]
        if step == 4:
            grads[1] = None  # skipped by the per-tensor optimizer: the buckets are split back into their members
        step_alike(((plain, plain_opt), (bucketed, bucketed_opt)), grads)
        for a, b in zip(plain, bucketed):
            assert torch.equal(a, b), step
        groups = bucketed_opt.param_groups[0]["params"]
        if step < 4:
            assert len(bucketed_opt._qlora_buckets) == 1 and len(groups) == 3
        else:  # as the per-tensor optimizer holds them, in its order
            assert not bucketed_opt._qlora_buckets and [id(p) for p in groups] == [id(p) for p in bucketed]
    assert speed.bucket_optimizer_parameters(bucketed_opt) == []  # once, before the first step


def test_buckets_are_split_when_a_member_stops_being_a_view():
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    shapes = [(16, 512), (512, 16)]
    plain, bucketed, (plain_opt, bucketed_opt) = bucket_case(shapes, bnb.optim.AdamW8bit)
    (bucket,) = speed.bucket_optimizer_parameters(bucketed_opt)
    for step in range(3):
        if step == 1:
            bucketed[1].data = bucketed[1].data.clone()  # as a module.to() that copies would
            assert not bucket.intact()
        step_alike(((plain, plain_opt), (bucketed, bucketed_opt)), [torch.randn(shape) for shape in shapes])
        assert all(torch.equal(a, b) for a, b in zip(plain, bucketed)), step  # the copy is updated, not the bucket
    assert not bucketed_opt._qlora_buckets


def test_buckets_keep_states_where_their_members_would_and_skip_what_would_change():
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    shapes = [(16, 2560)] * 5 + [(400, 256)]  # 40,960 each; 102,400 would be paged on its own
    _, params, (_, opt) = bucket_case(shapes, bnb.optim.PagedAdamW8bit)
    (bucket,) = speed.bucket_optimizer_parameters(opt)
    assert bucket.members == params[:5] and bucket.flat.numel() == 5 * 40960
    assert opt.param_groups[0]["params"] == [params[5], bucket.flat]  # the one that would be paged stays alone
    assert not getattr(opt.get_state_buffer(bucket.flat, dtype=torch.uint8), "is_paged", False)
    # Without paging, size does not matter.
    _, _, (_, unpaged) = bucket_case(shapes, bnb.optim.AdamW8bit)
    assert [len(b.members) for b in speed.bucket_optimizer_parameters(unpaged)] == [6]
    # The members' gradients gathered in order; none at all: the bucket has none, and the optimizer skips it.
    for i, member in enumerate(bucket.members):
        member.grad = torch.full_like(member, float(i))
    bucket.gather_grads()
    assert torch.equal(bucket.flat.grad, torch.arange(5.0).repeat_interleave(40960))
    for member in bucket.members:
        member.grad = None
    bucket.gather_grads()
    assert bucket.flat.grad is None
    # A loaded state of another size (a checkpoint of another layout) is told apart.
    assert speed.bucket_states_fit(opt)
    opt.state[bucket.flat] = {"step": 3, "state1": torch.zeros(4 * 40960, dtype=torch.uint8)}
    assert not speed.bucket_states_fit(opt)
    # Optimizers whose update is not element by element, and torch's own, are left as they are.
    for cls in (bnb.optim.LAMB8bit, torch.optim.AdamW):
        _, _, (_, other) = bucket_case(shapes, cls)
        assert speed.bucket_optimizer_parameters(other) == []
