"""Tiny stand-ins for tests and demos: a random-weight Llama-style model, a byte-level BPE tokenizer with a
chat template (Korean and English), and a small learnable bilingual QA set. Nothing is downloaded.

    folder = build_tiny_model(tmp_path / "model", texts=qa_texts(bilingual_qa_records()))
    cfg = {"model": {"name": str(folder)}, ...}

The model loads through the same `from_pretrained` path as a real one, including bitsandbytes 4-bit.
`save_exaone_checkpoint` writes random weights exactly as EXAONE 3.5's hub checkpoints are (`model_type: exaone`,
EXAONE's weight names and config fields, shard by shard): the default model as users get it, at any size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

# A compact template in the shape real chat templates have: role headers, an end-of-turn token, and a
# generation prompt. It names `eos_token` the way hub templates do.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endofturn|>", "<|system|>", "<|user|>", "<|assistant|>"]

_QA_PAIRS = [
    ("What is the capital of Korea?", "Seoul is the capital of Korea."),
    ("한국의 수도는 어디인가요?", "한국의 수도는 서울입니다."),
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("하늘은 무슨 색인가요?", "맑은 날 하늘은 파란색입니다."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("고양이는 다리가 몇 개인가요?", "고양이는 다리가 네 개입니다."),
    ("What do bees make?", "Bees make honey."),
    ("벌은 무엇을 만드나요?", "벌은 꿀을 만듭니다."),
]


def bilingual_qa_records(repeats: int = 8) -> list[dict[str, str]]:
    """A learnable QA set: a few Korean and English question/answer pairs, each repeated `repeats` times."""
    return [{"question": q, "answer": a} for _ in range(repeats) for q, a in _QA_PAIRS]


def qa_texts(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every string value of the records, to train the tokenizer on."""
    return [value for record in records for value in record.values() if isinstance(value, str)]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `texts` (so any Korean or English input encodes), with a pad
    token, an end-of-turn token used as eos, and `TINY_CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts) + ["system user assistant"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|endofturn|>", bos_token=None
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    folder: str | Path,
    texts: Iterable[str] | None = None,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    chat_template: bool = True,
) -> Path:
    """Save a random-weight Llama-style causal LM and its tokenizer to `folder`; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts if texts is not None else qa_texts(bilingual_qa_records(1)))
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # Wide enough weights that LoRA can move the logits far in a few steps (0.02 caps them near 1).
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# EXAONE-3.5's published shapes (the hub's config.json files), in EXAONE's own field names.
EXAONE_35_SHAPES: dict[str, dict[str, Any]] = {
    "2.4b": dict(hidden_size=2560, num_layers=30, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=7168, vocab_size=102400, tie_word_embeddings=True),
    "7.8b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=102400, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, num_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27392, vocab_size=102400, tie_word_embeddings=False),
}


def exaone_config(shape: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """An EXAONE 3.5 `config.json` (the hub's fields, names and rope scaling) of the given shape."""
    return {
        "activation_function": "silu",
        "architectures": ["ExaoneForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embed_dropout": 0.0,
        "eos_token_id": 361,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "max_position_embeddings": 32768,
        "model_type": "exaone",
        "pad_token_id": 0,
        "rope_scaling": {
            "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **shape,
        **fields,
    }


def exaone_weight_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of an EXAONE 3.x checkpoint, by the name the hub's files give it, in file order."""
    h, i, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    names = [("transformer.wte.weight", (vocab, h))]
    for n in range(config["num_layers"]):
        block = f"transformer.h.{n}."
        names += [
            (block + "ln_1.weight", (h,)),
            (block + "attn.attention.q_proj.weight", (q, h)),
            (block + "attn.attention.k_proj.weight", (kv, h)),
            (block + "attn.attention.v_proj.weight", (kv, h)),
            (block + "attn.attention.out_proj.weight", (h, q)),
            (block + "ln_2.weight", (h,)),
            (block + "mlp.c_fc_0.weight", (i, h)),
            (block + "mlp.c_fc_1.weight", (i, h)),
            (block + "mlp.c_proj.weight", (h, i)),
        ]
    names.append(("transformer.ln_f.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        names.append(("lm_head.weight", (vocab, h)))
    return names


def save_exaone_checkpoint(
    folder: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    std: float | None = None,
    device: str = "cpu",
    shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Random bf16 weights (normal with `std`, default the config's initializer range; norms at one) saved as
    EXAONE's hub checkpoints are: `config.json`, safetensors shards under EXAONE's weight names and their index.
    One shard is in memory at a time, so a model larger than the host's memory, or than twice the disk, is
    written. Returns the folder."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    std = config.get("initializer_range", 0.02) if std is None else std
    shapes = exaone_weight_shapes(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16) * std
            tensors[name] = tensor.cpu().contiguous()
            weight_map[name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    total = sum(2 * math.prod(shape) for _, shape in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_tiny_exaone_model(
    folder: str | Path, texts: Iterable[str] | None = None, *, hidden_size: int = 64, layers: int = 2, seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """A tiny random-weight model in EXAONE 3.5's hub format (`save_exaone_checkpoint`) with the tiny tokenizer
    and its ids; returns the folder."""
    folder = Path(folder)
    tokenizer = build_tokenizer(texts if texts is not None else qa_texts(bilingual_qa_records(1)))
    shape = dict(
        hidden_size=hidden_size, num_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=hidden_size * 2, vocab_size=len(tokenizer), tie_word_embeddings=tie_word_embeddings,
    )
    config = exaone_config(
        shape, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, initializer_range=0.2,  # as build_tiny_model: LoRA can move the logits in a few steps
    )
    config["rope_scaling"]["original_max_position_embeddings"] = 1024  # below max_position_embeddings, as the hub's
    save_exaone_checkpoint(folder, config, seed=seed)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records as JSON Lines (UTF-8, Korean kept readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_config(model_dir: str | Path, data_path: str | Path, output_dir: str | Path, **training: Any) -> dict:
    """A trainer config document (camelCase, as the operator writes it) sized for a CPU test run."""
    return {
        "model": {"name": str(model_dir)},
        "dataset": {"path": str(data_path), "evalFraction": 0.25},
        "quantization": {"bits": 4, "computeDtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": "all-linear"},
        "training": {
            "maxSteps": 20,
            "batchSize": 4,
            "gradientAccumulationSteps": 2,
            "learningRate": 1e-2,
            "maxGradNorm": 1.0,
            "optimizer": "adamw_torch",
            "scheduler": "constant",
            "warmupRatio": 0.0,
            "maxLength": 64,
            "gradientCheckpointing": False,
            "checkpointEvery": 10,
            "evalEvery": 10,
            **training,
        },
        "output": {"dir": str(output_dir)},
        "metrics": {"port": 0},
        "gpus": 0,
        "terminationMessagePath": str(Path(output_dir) / "termination-log"),
    }
