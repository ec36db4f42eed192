"""Data: every file type and format, `auto` detection, renames, system prompt, the loss mask, truncation
counting, the eval split, bad and empty data, and packing that leaves the loss unchanged."""

from __future__ import annotations

import csv
import json

import pytest

from qlora_trainer.config import DatasetConfig
from qlora_trainer.data import (
    BOUNDARY_KEYS,
    IGNORE_INDEX,
    collator,
    detect_format,
    prepare_data,
    read_file,
    split_indices,
    split_packed,
)
from qlora_trainer.errors import DatasetInvalid
from qlora_trainer.testing import write_jsonl

QA = {"question": "What do bees make?", "answer": "Bees make honey."}


def only(records, tokenizer, max_length=256, **dataset):
    """Encode records with no eval split; returns (examples, stats)."""
    cfg = DatasetConfig(inline=records, eval_fraction=0, **dataset)
    prepared = prepare_data(cfg, tokenizer, max_length, seed=1)
    return prepared.train, prepared.stats


def learned(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def prompt_part(tokenizer, example) -> str:
    return tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l == IGNORE_INDEX])


@pytest.mark.parametrize(
    ("record", "fmt", "prompt", "answer"),
    [
        (QA, "qa", "What do bees make?", "Bees make honey."),
        (
            {"instruction": "Translate to English.", "input": "감사합니다", "output": "Thank you."},
            "instruction",
            "Translate to English.\n\n감사합니다",
            "Thank you.",
        ),
        (
            {"messages": [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "반갑습니다"}]},
            "chat",
            "안녕하세요",
            "반갑습니다",
        ),
    ],
)
@pytest.mark.parametrize("declared", [True, False], ids=["declared", "auto"])
def test_each_format_renders_with_the_chat_template_and_learns_only_the_answer(
    tokenizer, record, fmt, prompt, answer, declared
):
    examples, stats = only([record], tokenizer, format=fmt if declared else "auto")
    assert stats.format == fmt
    (example,) = examples
    full = tokenizer.decode(example["input_ids"])
    assert full.startswith("<|user|>\n") and prompt in full
    # The loss mask: the answer and its end-of-turn token carry loss, no prompt token does.
    assert learned(tokenizer, example).strip() == answer + tokenizer.eos_token
    assert prompt in prompt_part(tokenizer, example)
    assert answer not in prompt_part(tokenizer, example)


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "auto"])
def test_text_format_learns_every_token(tokenizer, declared):
    examples, stats = only([{"text": "Bees make honey. 벌은 꿀을 만듭니다."}], tokenizer, format="text" if declared else "auto")
    assert stats.format == "text"
    assert examples[0]["labels"] == examples[0]["input_ids"]
    assert tokenizer.decode(examples[0]["input_ids"]) == "Bees make honey. 벌은 꿀을 만듭니다." + tokenizer.eos_token


def test_multi_turn_chat_learns_every_assistant_turn_and_no_user_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "How are you?"},
        {"role": "user", "content": "I am fine."},
        {"role": "assistant", "content": "감사합니다"},
    ]
    (example,), _ = only([{"messages": messages}], tokenizer)
    text = learned(tokenizer, example)
    assert "How are you?" in text and "감사합니다" in text
    assert "Hello there" not in text and "I am fine." not in text and "Be kind." not in text


def test_fields_rename_columns_and_auto_detection_follows_them(tokenizer):
    records = [{"q": "What do bees make?", "a": "Bees make honey.", "id": 7}]
    (example,), stats = only(records, tokenizer, fields={"question": "q", "answer": "a"})
    assert stats.format == "qa"
    assert learned(tokenizer, example).startswith("Bees make honey.")


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages"], "chat"),
        (["instruction", "input", "output"], "instruction"),
        (["question", "answer"], "qa"),
        (["prompt", "completion"], "qa"),
        (["text", "meta"], "text"),
    ],
)
def test_auto_detection_from_columns(columns, expected):
    assert detect_format(columns)[0] == expected


def test_undetectable_columns_say_what_was_expected():
    with pytest.raises(DatasetInvalid, match=r"cannot detect.*\['a', 'b'\].*dataset.format"):
        detect_format(["a", "b"])


def test_system_prompt_goes_in_front_and_carries_no_loss(tokenizer):
    (example,), _ = only([QA], tokenizer, system_prompt="You are a helpful assistant.")
    assert tokenizer.decode(example["input_ids"]).startswith("<|system|>\nYou are a helpful assistant.")
    assert "helpful" not in learned(tokenizer, example)


def test_plain_layout_when_the_tokenizer_has_no_chat_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    (example,), _ = only([QA], plain)
    full = plain.decode(example["input_ids"])
    assert full.startswith("### Question:\nWhat do bees make?\n\n### Answer:\n")
    assert learned(plain, example).strip() == "Bees make honey." + plain.eos_token


def test_truncation_is_counted_and_examples_without_answer_are_skipped(tokenizer):
    long_answer = {"question": "Why?", "answer": "Because bees make honey. " * 20}
    long_question = {"question": "Bees make honey. " * 40, "answer": "Yes."}
    examples, stats = only([QA, long_answer, long_question], tokenizer, max_length=32)
    assert stats.truncated == 2
    assert stats.skipped_no_answer == 1
    assert len(examples) == 2
    assert all(len(e["input_ids"]) <= 32 for e in examples)


def test_eval_split_is_deterministic_by_seed():
    first, second = split_indices(100, 0.1, seed=7), split_indices(100, 0.1, seed=7)
    assert first == second
    train, held = first
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100
    assert split_indices(100, 0.1, seed=8)[1] != held
    assert split_indices(1, 0.3, seed=1) == ([0], [])
    assert len(split_indices(3, 0.05, seed=1)[1]) == 1  # a fraction above 0 holds out at least one


RECORDS = [QA, {"question": "한국의 수도는?", "answer": "서울입니다."}]


def write_all_types(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(folder / "data.jsonl", RECORDS)}
    paths["json"] = folder / "data.json"
    paths["json"].write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    paths["csv"] = folder / "data.csv"
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(RECORDS)
    paths["parquet"] = folder / "data.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"])
    paths["no-extension"] = write_jsonl(folder / "data", RECORDS)  # a ConfigMap key without a suffix
    return paths


def test_every_file_type_reads_the_same_records(tmp_path):
    for kind, path in write_all_types(tmp_path).items():
        assert [r.data for r in read_file(path)] == RECORDS, kind


def test_hub_dataset_by_name_loads_through_datasets(tmp_path, tokenizer):
    folder = tmp_path / "hub-style"
    write_jsonl(folder / "train.jsonl", RECORDS)
    prepared = prepare_data(
        DatasetConfig(hf={"name": str(folder), "split": "train"}, eval_fraction=0), tokenizer, 128, seed=1
    )
    assert prepared.stats.records == 2 and prepared.stats.format == "qa"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "a", "answer": "b"}\n{"question": "c"}\n', r"line 2: field `answer` is missing"),
        ('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": \n', r"line 3: invalid JSON"),
        ('{"question": "a", "answer": ["b"]}\n', r"line 1: field `answer`: expected a string, got a list"),
        ('{"question": "a", "answer": null}\n', r"line 1: field `answer`: expected a non-empty string, got null"),
        ('["not", "an", "object"]\n', r"record 1: expected an object"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n',
            r"line 1: field `messages\[1\].role`: expected one of system, user, assistant, got 'bot'",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"line 1: .*at least one assistant message"),
        ("", r"empty"),
        ("\n\n", r"empty"),
    ],
)
def test_bad_data_names_line_field_and_expectation(tmp_path, tokenizer, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetInvalid, match=message):
        prepare_data(DatasetConfig(path=str(path), eval_fraction=0), tokenizer, 128, seed=1)


def test_missing_file_is_named(tmp_path, tokenizer):
    with pytest.raises(DatasetInvalid, match="nowhere.jsonl not found"):
        prepare_data(DatasetConfig(path=str(tmp_path / "nowhere.jsonl")), tokenizer, 128, seed=1)


def test_csv_bad_row_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text("question,answer\nWhat?,This.\nWho?,\n", encoding="utf-8")
    with pytest.raises(DatasetInvalid, match=r"line 3: field `answer`"):
        prepare_data(DatasetConfig(path=str(path), eval_fraction=0), tokenizer, 128, seed=1)


def test_packed_batch_has_the_same_loss_as_the_padded_batch(tiny_model_dir, tokenizer):
    """Packing is exact: one row with restarting position ids gives the loss of the padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32,
        device_map={"": "cpu"},
    )
    records = [
        {"question": "What do bees make?", "answer": "Bees make honey."},
        {"question": "한국의 수도는 어디인가요?", "answer": "한국의 수도는 서울입니다."},
        {"question": "How many legs does a cat have?", "answer": "A cat has four legs. Four!"},
    ]
    examples, _ = only(records, tokenizer)
    packed, padded = collator(tokenizer, packing=True)(examples), collator(tokenizer, packing=False)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert padded["attention_mask"].sum() == packed["input_ids"].numel()  # packing keeps exactly the real tokens
    with torch.no_grad():
        packed_loss = model(**packed, use_cache=False).loss
        padded_loss = model(**padded, use_cache=False).loss
        # Packed rows attend only within their example: without the position ids the loss differs.
        mixed_loss = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert torch.allclose(packed_loss, padded_loss, atol=1e-4)
    assert not torch.allclose(mixed_loss, padded_loss, atol=1e-3)

    # Cut to a token budget, the parts' summed losses (per answer token of the whole batch) are the same.
    parts = split_packed(packed, token_budget=max(len(e["input_ids"]) for e in examples) + 1)
    assert len(parts) > 1
    assert sum(p["input_ids"].shape[1] for p in parts) == packed["input_ids"].shape[1]
    answer_tokens = (packed["labels"][:, 1:] != IGNORE_INDEX).sum()
    with torch.no_grad():
        total = sum(model(**p, use_cache=False, num_items_in_batch=answer_tokens).loss for p in parts)
    assert torch.allclose(total, padded_loss, atol=1e-4)


def test_packed_batches_carry_the_example_boundaries_and_a_row_within_the_budget_is_not_read_back():
    import torch

    examples = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (4, 7, 3)]
    batch = collator(None, packing=True, boundaries=True)(examples)
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 4, 11, 14]
    assert batch["max_length_q"] == batch["max_length_k"] == 7
    assert "cu_seq_lens_q" not in collator(None, packing=True)(examples)

    class Unreadable(torch.Tensor):
        """Position ids whose values may not be looked at (on a GPU, looking means waiting for it)."""

        def __eq__(self, other):
            raise AssertionError("positions read back")

    fits = dict(batch, position_ids=batch["position_ids"].as_subclass(Unreadable))
    assert split_packed(fits, token_budget=14) == [fits]
    parts = split_packed(batch, token_budget=11)
    assert [p["input_ids"].shape[1] for p in parts] == [11, 3]
    # The whole row's boundaries do not describe a part: the attention works them out from its positions.
    assert all(not set(BOUNDARY_KEYS) & set(p) for p in parts)
    assert parts[1]["position_ids"].tolist() == [[0, 1, 2]]


def test_hub_dataset_that_cannot_load_offline_says_so(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetInvalid, match=r"hub dataset nobody/no-such-set \(split train\).*HF_HUB_OFFLINE"):
        prepare_data(DatasetConfig(hf={"name": "nobody/no-such-set"}), tokenizer, 128, seed=1)


def test_decomposed_korean_is_trained_as_the_composed_text_seen_at_inference(tmp_path, tokenizer):
    import unicodedata

    composed = {"question": "진행 상황은 어떻게 보나요?", "answer": "kubectl get qft 를 실행하세요."}
    decomposed = {k: unicodedata.normalize("NFD", v) for k, v in composed.items()}  # as macOS exports it
    assert decomposed != composed
    encoded = []
    for name, record in (("nfc.jsonl", composed), ("nfd.jsonl", decomposed)):
        path = write_jsonl(tmp_path / name, [record])
        encoded.append(prepare_data(DatasetConfig(path=str(path), eval_fraction=0), tokenizer, 128, seed=1).train)
    assert encoded[1] == encoded[0]
    csv_path = tmp_path / "nfd.csv"
    csv_path.write_text(f"question,answer\n{decomposed['question']},{decomposed['answer']}\n", encoding="utf-8")
    assert prepare_data(DatasetConfig(path=str(csv_path), eval_fraction=0), tokenizer, 128, seed=1).train == encoded[0]
