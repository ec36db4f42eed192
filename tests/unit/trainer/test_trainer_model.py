"""Model: bitsandbytes configs, LoRA targets per architecture's naming, and the real 4-bit load with LoRA."""

from __future__ import annotations

import pytest

from qlora_trainer.config import LoraConfig as LoraSpec
from qlora_trainer.config import QuantizationConfig, TrainerConfig
from qlora_trainer.errors import InvalidConfig, ModelLoadFailed
from qlora_trainer.model import (
    attention_targets,
    linear_module_names,
    load_model,
    lora_config,
    quantization_config,
    resolve_targets,
    supports_packing,
)


def layer_names(prefix: str, leaves: list[str], layers: int = 2) -> list[str]:
    return [f"{prefix}.{i}.{leaf}" for i in range(layers) for leaf in leaves]


LLAMA = layer_names(
    "model.layers",
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
)
ARCHITECTURES = {
    # Llama, Mistral, Qwen2/3 and Gemma share this naming.
    "llama": (LLAMA, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "phi-3": (
        layer_names("model.layers", ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
        ["qkv_proj", "o_proj"],
    ),
    "phi-2": (
        layer_names("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                                     "mlp.fc1", "mlp.fc2"]),
        ["q_proj", "k_proj", "v_proj", "dense"],
    ),
    # GPT-2's MLP also has a `c_proj`: the attention one is named with its parent.
    "gpt-2": (layer_names("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
              ["c_attn", "attn.c_proj"]),
    # EXAONE 3.x with its own (remote) modeling code.
    "exaone-remote": (
        layer_names("transformer.h", ["attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj",
                                      "attn.attention.out_proj", "mlp.c_fc_0", "mlp.c_fc_1", "mlp.c_proj"]),
        ["q_proj", "k_proj", "v_proj", "out_proj"],
    ),
    "falcon": (layer_names("transformer.h", ["self_attention.query_key_value", "self_attention.dense",
                                             "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
               ["query_key_value", "dense"]),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_empty_targets_mean_the_attention_projections(arch):
    names, expected = ARCHITECTURES[arch]
    assert sorted(attention_targets(names)) == sorted(expected)
    targets = resolve_targets(LoraSpec(), names)
    # Every key matches attention layers only, as peft will match it.
    for key in targets:
        hits = [n for n in names if n == key or n.endswith("." + key)]
        assert hits and all(".mlp." not in n for n in hits)


def test_gpt2_naming_from_a_real_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    assert sorted(attention_targets(linear_module_names(model))) == ["attn.c_proj", "c_attn"]


def test_all_linear_and_named_targets_are_honoured():
    assert resolve_targets(LoraSpec(target_modules="all-linear"), LLAMA) == "all-linear"
    assert resolve_targets(LoraSpec(target_modules=["q_proj", "mlp.down_proj"]), LLAMA) == ["q_proj", "mlp.down_proj"]


def test_a_target_that_matches_nothing_lists_the_layers_that_exist():
    with pytest.raises(InvalidConfig, match=r"query_proj match no layer.*down_proj, gate_proj, k_proj, o_proj"):
        resolve_targets(LoraSpec(target_modules=["q_proj", "query_proj"]), LLAMA)


def test_quantization_config_maps_every_field():
    import torch

    nf4 = quantization_config(QuantizationConfig())
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    fp4 = quantization_config(QuantizationConfig(type="fp4", double_quant=False, compute_dtype="float16"))
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    assert fp4.bnb_4bit_compute_dtype == torch.float16
    assert quantization_config(QuantizationConfig(bits=8)).load_in_8bit


def test_lora_config_maps_every_field():
    config = lora_config(LoraSpec(r=4, alpha=8, dropout=0.2, bias="lora_only"), ["q_proj"])
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (4, 8, 0.2, "lora_only")
    assert config.use_rslora and config.init_lora_weights == "gaussian" and config.task_type == "CAUSAL_LM"
    assert lora_config(LoraSpec(init="default"), ["q_proj"]).init_lora_weights is True
    with pytest.raises(InvalidConfig, match="lora.init: loftq"):
        lora_config(LoraSpec(init="loftq"), ["q_proj"])


def model_config(model_dir, **sections) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"name": str(model_dir)},
            "dataset": {"inline": [{"question": "a", "answer": "b"}]},
            "quantization": {"computeDtype": "float32", **sections.pop("quantization", {})},
            "output": {"dir": "/tmp/unused"},
            "gpus": 0,
            **sections,
        }
    )


@pytest.mark.parametrize(
    "quantization", [{}, {"type": "fp4", "doubleQuant": False}, {"bits": 8}], ids=["nf4-double-quant", "fp4", "8-bit"]
)
def test_load_model_quantizes_and_adds_lora_on_attention(tiny_model_dir, quantization):
    import bitsandbytes as bnb

    model, tokenizer = load_model(model_config(tiny_model_dir, quantization=quantization))
    base = model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    if quantization.get("bits") == 8:
        assert isinstance(q_proj.base_layer, bnb.nn.Linear8bitLt)
    else:
        assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
        assert q_proj.base_layer.weight.quant_type == quantization.get("type", "nf4")
    assert sorted(model.peft_config["default"].target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert supports_packing(model)


def test_unknown_target_fails_before_training_with_the_layer_names(tiny_model_dir):
    with pytest.raises(InvalidConfig, match=r"lora.targetModules: attn_qkv match no layer.*q_proj"):
        load_model(model_config(tiny_model_dir, lora={"targetModules": ["attn_qkv"]}))


def test_missing_model_fails_with_model_load_failed(tmp_path):
    with pytest.raises(ModelLoadFailed, match=r"could not load the tokenizer of .*no-such-model"):
        load_model(model_config(tmp_path / "no-such-model"))


def test_gradients_still_reach_every_layer_after_an_evaluation(tiny_model_dir, tokenizer):
    """bitsandbytes repacks CPU weights for inference in eval mode, which would cut the backward path."""
    import torch

    model, _ = load_model(model_config(tiny_model_dir, lora={"dropout": 0}))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    ids = tokenizer("Bees make honey. 벌은 꿀을 만듭니다.", return_tensors="pt")["input_ids"]

    def gradients():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    after = gradients()
    assert all(torch.allclose(before[n], after[n]) for n in before)
