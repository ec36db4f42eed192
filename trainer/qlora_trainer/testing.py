"""Tiny stand-ins for tests and demos: a random-weight Llama-style model, a byte-level BPE tokenizer with a
chat template (Korean and English), and a small learnable bilingual QA set. Nothing is downloaded.

    folder = build_tiny_model(tmp_path / "model", texts=qa_texts(bilingual_qa_records()))
    cfg = {"model": {"name": str(folder)}, ...}

The model loads through the same `from_pretrained` path as a real one, including bitsandbytes 4-bit.
"""

from __future__ import annotations

import json
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
