"""Shared fixtures of the trainer tests: a tiny random-weight model and tokenizer saved once per session,
loaded through the real `from_pretrained` path; no downloads."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: a wrong path fails at once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qlora_trainer.testing import bilingual_qa_records, build_tiny_model, qa_texts  # noqa: E402

EXTRA_TEXTS = [
    "Summarise the text. Translate to English. Be kind. You are a helpful assistant.",
    "Hello there, how are you? I am fine. 안녕하세요 반갑습니다 감사합니다",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-style model with a byte-level BPE tokenizer and a chat template."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-model"), qa_texts(bilingual_qa_records(1)) + EXTRA_TEXTS
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
