"""EXAONE 3.5 as the hub ships it (`model_type: exaone`, EXAONE's weight names), on the CPU: the checkpoint the
tests and the benchmark write is that format, transformers loads it as Llama's code, and every decision of the
fast path that can be made without a GPU comes out as it does for a Llama-typed copy of the same weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from qlora_trainer import speed  # noqa: E402
from qlora_trainer.testing import (  # noqa: E402
    EXAONE_35_SHAPES,
    build_tiny_exaone_model,
    exaone_config,
    exaone_weight_shapes,
)


@pytest.fixture(scope="module")
def exaone_dir(tmp_path_factory):
    return build_tiny_exaone_model(tmp_path_factory.mktemp("exaone"))


def load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)


def test_the_checkpoint_is_the_hubs_format(exaone_dir):
    config = json.loads((exaone_dir / "config.json").read_text())
    assert config["model_type"] == "exaone" and config["architectures"] == ["ExaoneForCausalLM"]
    assert {"num_layers", "layer_norm_epsilon", "activation_function"} <= set(config)
    index = json.loads((exaone_dir / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "transformer.h.1.attn.attention.out_proj.weight" in names and "transformer.wte.weight" in names
    assert "lm_head.weight" not in names  # tied, as the 2.4B checkpoint is
    assert not any(name.startswith("model.") for name in names)


def test_transformers_loads_it_as_llama_with_its_own_weights(exaone_dir):
    from safetensors.torch import load_file

    model = load(exaone_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "exaone"
    stored = {}
    for file in sorted(exaone_dir.glob("model-*.safetensors")):
        stored.update(load_file(file))
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, stored["transformer.h.1.attn.attention.out_proj.weight"].float())
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, stored["transformer.h.0.mlp.c_fc_1.weight"].float())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_liger_keys_on_the_code_that_runs_the_model(exaone_dir):
    exaone = load(exaone_dir)
    table = {"llama": None, "gemma3_text": None, "gemma3": None, "exaone4": None}
    assert speed.liger_architecture(exaone, table) == "llama"
    assert speed.liger_architecture(exaone, {"mistral": None}) is None
    # Liger's own table, where it imports on this machine (Triton may not): still no "exaone" entry of its own.
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - Triton fails to import without a GPU on some machines
        return
    assert "exaone" not in MODEL_TYPE_TO_APPLY_LIGER_FN
    assert speed.liger_architecture(exaone, MODEL_TYPE_TO_APPLY_LIGER_FN) == "llama"


def test_liger_keeps_a_types_own_entry_where_that_type_is_the_module():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )
    gemma = Gemma3ForCausalLM(config)  # modeling_gemma3, model_type gemma3_text: Liger's text-only entry
    assert speed.liger_architecture(gemma, {"gemma3_text": None, "gemma3": None}) == "gemma3_text"


def test_remote_code_gets_no_liger_entry():
    remote = type("ExaoneForCausalLM", (torch.nn.Module,), {"__module__": "transformers_modules.exaone.modeling_exaone"})
    model = remote()
    model.config = SimpleNamespace(model_type="llama")
    assert speed.liger_architecture(model, {"llama": None}) is None


def test_the_shape_and_plan_are_the_llama_copys(exaone_dir):
    from transformers import LlamaConfig

    model = load(exaone_dir)
    hub = json.loads((exaone_dir / "config.json").read_text())
    llama = LlamaConfig(
        hidden_size=hub["hidden_size"], num_hidden_layers=hub["num_layers"], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=hub["intermediate_size"], vocab_size=hub["vocab_size"],
    )
    assert speed.ModelShape.from_config(model.config) == speed.ModelShape.from_config(llama)


@pytest.mark.parametrize("size", sorted(EXAONE_35_SHAPES))
def test_published_shapes_count_as_their_names_say(size):
    config = exaone_config(EXAONE_35_SHAPES[size])
    params = sum(torch.Size(shape).numel() for _, shape in exaone_weight_shapes(config))
    assert abs(params / 1e9 - float(size[:-1])) / float(size[:-1]) < 0.1, params
    shape = speed.ModelShape.from_config(SimpleNamespace(**config))
    assert shape.head_dim * shape.num_heads == shape.hidden_size


def test_the_trainer_loads_it_in_4_bits_with_loras_targets(exaone_dir, tmp_path):
    from qlora_trainer.config import TrainerConfig
    from qlora_trainer.model import load_model, supports_packing
    from qlora_trainer.testing import bilingual_qa_records, tiny_config, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", bilingual_qa_records(1))
    cfg = tiny_config(exaone_dir, data, tmp_path / "out")
    cfg["lora"]["targetModules"] = []  # the attention projections, found by name
    model, _ = load_model(TrainerConfig.model_validate(cfg))
    targets = model.peft_config["default"].target_modules
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert supports_packing(model)


def test_the_architectures_config_fields_it_lacks_are_given_their_defaults(exaone_dir):
    model = load(exaone_dir)
    assert not hasattr(model.config, "pretraining_tp")  # Liger's Llama loss forward reads it
    assert speed.borrow_config_defaults(model.config, "llama") == ["pretraining_tp"]
    assert model.config.pretraining_tp == 1 and model.config.model_type == "exaone"
    assert speed.borrow_config_defaults(model.config, "llama") == []
    from transformers import LlamaConfig

    assert speed.borrow_config_defaults(LlamaConfig(), "llama") == []  # its own class: nothing to borrow


def test_the_trainer_trains_and_merges_the_hub_format(exaone_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_trainer.config import TrainerConfig
    from qlora_trainer.output import merge_adapter
    from qlora_trainer.testing import bilingual_qa_records, tiny_config, write_jsonl
    from qlora_trainer.training import train

    data = write_jsonl(tmp_path / "data.jsonl", bilingual_qa_records(6))
    cfg = TrainerConfig.model_validate(
        tiny_config(exaone_dir, data, tmp_path / "out", maxSteps=20, batchSize=4, maxLength=40, evalEvery=20)
    )
    summary = train(cfg)
    assert summary["status"] == "Succeeded" and summary["evalLoss"] < 0.7 * summary["initialEvalLoss"], summary
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(cfg, tmp_path / "out"), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(load(exaone_dir), tmp_path / "out")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
