"""EXAONE 3.5 as the hub ships it, and attention and LoRA on the fast path against the plain path, on a CUDA GPU
(issue 17). Skipped without CUDA.

- A checkpoint saved as EXAONE's own (`model_type: exaone`, EXAONE's weight names) gets the `speed:` line of a
  Llama-typed copy of the same shape: Liger's RoPE, SwiGLU and fused loss, the native RMSNorm, varlen attention,
  the planner's fused-loss memory model and the CUDA graphs.
- Varlen attention (the kernel, or the masked fallback where the kernel would compute something else: a sliding
  window shorter than an example, softcapping) gives each example of a packed row what the model gives it alone.
- The fast LoRA path (dequantized weight cache, fused q/k/v, lean forward) against peft's own forward over
  bitsandbytes' 4-bit matmul, with rsLoRA on.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from qlora_trainer import speed  # noqa: E402
from qlora_trainer.config import TrainerConfig  # noqa: E402
from qlora_trainer.model import load_model  # noqa: E402
from qlora_trainer.testing import (  # noqa: E402
    bilingual_qa_records,
    build_tiny_exaone_model,
    build_tiny_model,
    qa_texts,
    tiny_config,
    write_jsonl,
)

MAX_LENGTH = 512
LENGTHS = (300, 200, 180)
FAST_KERNELS = ["rope", "swiglu", "fused_linear_cross_entropy", "rms_norm"]


def gpu_config(model_dir, tmp_path, **lora) -> TrainerConfig:
    data = write_jsonl(tmp_path / "data.jsonl", bilingual_qa_records(16))
    cfg = tiny_config(model_dir, data, tmp_path / "out")
    cfg["gpus"] = 1
    cfg["quantization"]["computeDtype"] = "bfloat16"
    cfg["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": [], **lora}
    return TrainerConfig.model_validate(cfg)


def configured(model_dir, tmp_path):
    model, _ = load_model(gpu_config(model_dir, tmp_path))
    setup = speed.configure(
        model, batch_size=2, gradient_accumulation_steps=8, max_length=MAX_LENGTH, lengths=[200] * 64,
        gradient_checkpointing=True, packing=True,
    )
    return model, setup


def llama_copy(exaone_dir, folder):
    """The same weights saved as a Llama-typed checkpoint (what the benchmark measured before 2026-12-04)."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    hub = json.loads((exaone_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=hub["vocab_size"], hidden_size=hub["hidden_size"], intermediate_size=hub["intermediate_size"],
        num_hidden_layers=hub["num_layers"], num_attention_heads=hub["num_attention_heads"],
        num_key_value_heads=hub["num_key_value_heads"], max_position_embeddings=hub["max_position_embeddings"],
        rms_norm_eps=hub["layer_norm_epsilon"], tie_word_embeddings=hub["tie_word_embeddings"],
        rope_parameters={**hub["rope_scaling"], "rope_theta": hub["rope_theta"]},
        pad_token_id=hub["pad_token_id"], eos_token_id=hub["eos_token_id"], bos_token_id=hub["bos_token_id"],
    )
    exaone = AutoModelForCausalLM.from_pretrained(exaone_dir, dtype=torch.bfloat16)
    llama = LlamaForCausalLM(config).to(torch.bfloat16)
    llama.load_state_dict(exaone.state_dict())
    llama.save_pretrained(folder)
    for file in exaone_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, folder / file.name)
    return folder


def test_exaones_own_format_gets_the_llama_copys_fast_path_and_numbers(tmp_path):
    exaone_dir = build_tiny_exaone_model(tmp_path / "exaone", qa_texts(bilingual_qa_records(1)), hidden_size=256, layers=3)
    llama_dir = llama_copy(exaone_dir, tmp_path / "llama")
    losses, types = [], []
    for folder, work in ((exaone_dir, tmp_path / "a"), (llama_dir, tmp_path / "b")):
        model, setup = configured(folder, work)
        assert setup.attention == speed.VARLEN, setup.describe()
        assert setup.kernels == FAST_KERNELS, setup.describe()
        assert setup.graphs is not None and setup.plan.checkpointed_layers == 0, setup.describe()
        assert setup.fused_groups == 3, setup.describe()
        model.train()
        ids, positions = packed_ids(model.config.vocab_size, 2)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as the Trainer runs it: Liger's loss, the graphs
            loss = model(input_ids=ids, position_ids=positions, labels=ids, skip_logits=True, use_cache=False).loss
        loss.backward()
        assert setup.graphs.stats.replayed == 1, setup.graphs.stats.describe()
        losses.append(float(loss.detach()))
        types.append(model.get_base_model().config.model_type)
    assert types == ["exaone", "llama"]
    assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[1]), losses  # the same weights, the same step


def packed_ids(vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (1, sum(LENGTHS)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return ids.cuda(), positions.cuda()


def small_model(kind: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    elif kind == "mistral-window":  # a window shorter than the examples: the masked fallback
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=128))
    else:  # Gemma-2: softcapping and a window
        model = Gemma2ForCausalLM(Gemma2Config(**shape, sliding_window=128, attn_logit_softcapping=50.0))
    return model.to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral-window", "gemma2-softcap"])
def test_varlen_gives_each_packed_example_what_the_model_gives_it_alone(kind):
    assert speed.choose_attention("cuda") == speed.VARLEN
    model = small_model(kind)
    ids, positions = packed_ids(model.config.vocab_size, 0)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        alone = torch.cat([model(input_ids=part).logits for part in ids.split(list(LENGTHS), 1)], 1).float()
        model.config._attn_implementation = speed.VARLEN
        packed = model(input_ids=ids, position_ids=positions).logits.float()
    assert float((packed - alone).norm() / alone.norm()) < 2e-2


def test_the_fast_lora_path_matches_peft_over_the_4bit_matmul_with_rslora(tmp_path):
    model_dir = build_tiny_exaone_model(tmp_path / "exaone", qa_texts(bilingual_qa_records(1)), hidden_size=256, layers=3)
    model, _ = load_model(gpu_config(model_dir, tmp_path, useRslora=True))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert abs(layer.scaling["default"] - 32 / 16**0.5) < 1e-9  # rsLoRA: alpha / sqrt(r)
    model.train()
    with torch.no_grad():  # B away from its zero init, so the update term counts
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    ids, positions = packed_ids(model.config.vocab_size, 1)
    batch = dict(input_ids=ids, position_ids=positions, labels=ids)

    def loss_and_grads():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in params])
        for p in params:
            p.grad = None
        return float(loss.detach()), grads

    plain_loss, plain = loss_and_grads()  # peft's forward over bitsandbytes' 4-bit matmul
    assert speed.cache_dequantized_weights(model.get_base_model()) > 0
    assert speed.use_lean_lora(model) > 0 and speed.fuse_projections(model) == 3
    fast_loss, fast = loss_and_grads()
    assert abs(fast_loss - plain_loss) < 1e-2 * abs(plain_loss)
    assert float((fast - plain).norm() / plain.norm()) < 2e-2
