"""Training data: read records (JSON Lines, JSON, CSV, Parquet, a hub dataset, or inline), check their shape,
render them with the tokenizer's chat template, and encode them with the loss on the answer tokens only.

Reading and checking are plain Python (so a bad record is reported by line number); rendering uses the
tokenizer's own chat template, or `PLAIN_TEMPLATE` when it has none. Batches are collated either padded
(`DataCollatorForSeq2Seq`) or packed into one row without padding (`DataCollatorWithFlattening`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import DatasetConfig
from .errors import DatasetInvalid

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a token that carries no loss

# Used when the tokenizer has no chat template: a plain Question/Answer layout ending answers with eos.
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Question:\n{{ message['content'] }}\n\n"
    "{% else %}### Answer:\n{{ message['content'] }}{% if eos_token %}{{ eos_token }}{% endif %}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Answer:\n{% endif %}"
)

# Canonical columns per format; `auto` also accepts the aliases (when `fields` does not rename them).
FORMAT_COLUMNS = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "qa": ("question", "answer"),
    "text": ("text",),
}
ALIASES = {
    "question": ("prompt", "query"),
    "answer": ("completion", "response"),
    "output": ("response",),
}
ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    """One raw record and where it came from (`line 7`, `row 3`, `record 2`), for error messages."""

    where: str
    data: dict[str, Any]


@dataclass
class DataStats:
    """What reading and encoding found; goes into summary.json and the log."""

    format: str = ""
    records: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    truncated: int = 0
    skipped_no_answer: int = 0
    answer_tokens: int = 0
    tokens: int = 0


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    stats: DataStats = field(default_factory=DataStats)


# ---------------------------------------------------------------- reading


def read_records(cfg: DatasetConfig) -> list[Record]:
    """The raw records of the configured source, each with its position; empty data fails."""
    if cfg.inline is not None:
        records = [Record(f"record {i}", r) for i, r in enumerate(cfg.inline, 1)]
        source = "dataset.inline"
    elif cfg.hf is not None:
        records = _read_hub(cfg.hf.name, cfg.hf.subset, cfg.hf.split)
        source = f"hub dataset {cfg.hf.name} (split {cfg.hf.split})"
    else:
        records = read_file(Path(cfg.path))
        source = str(cfg.path)
    if not records:
        raise DatasetInvalid(f"{source}: the dataset is empty: no records to train on")
    for record in records:
        if not isinstance(record.data, dict):
            raise DatasetInvalid(
                f"{source}: {record.where}: expected an object with named fields, got {_kind(record.data)}"
            )
    return records


def read_file(path: Path) -> list[Record]:
    """Records of a JSON Lines, JSON, CSV or Parquet file, chosen by extension or, without one, by content."""
    if not path.is_file():
        raise DatasetInvalid(f"dataset file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetInvalid(f"{path}: not UTF-8 text ({err})") from None
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
    head = text.lstrip()[:1]
    if suffix == ".json" or head == "[":
        try:
            return _records_of_json(path, json.loads(text))
        except json.JSONDecodeError as err:
            if head != "{":  # a .json file may still be JSON Lines
                raise DatasetInvalid(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
    if suffix in (".jsonl", ".ndjson", ".json") or head == "{":
        return _read_jsonl(path, text)
    if head == "":
        return []
    return _read_csv(path, text, ",")


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(Record(f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DatasetInvalid(f"{path}: line {number}: invalid JSON: {err.msg}") from None
    return records


def _records_of_json(path: Path, document: Any) -> list[Record]:
    if isinstance(document, dict):  # {"data": [...]} or {"train": [...]}: the one list inside
        lists = [v for v in document.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DatasetInvalid(f"{path}: expected a JSON list of records (or an object holding one list)")
        document = lists[0]
    if not isinstance(document, list):
        raise DatasetInvalid(f"{path}: expected a JSON list of records, got {_kind(document)}")
    return [Record(f"record {i}", r) for i, r in enumerate(document, 1)]


def _read_csv(path: Path, text: str, delimiter: str) -> list[Record]:
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    records = []
    for row in reader:
        if None in row:  # more cells than header columns
            raise DatasetInvalid(f"{path}: line {reader.line_num}: more values than the header's columns")
        records.append(Record(f"line {reader.line_num}", {k: v for k, v in row.items() if k is not None}))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DatasetInvalid(f"{path}: not a readable Parquet file: {err}") from None
    return [Record(f"row {i}", r) for i, r in enumerate(rows, 1)]


def _read_hub(name: str, subset: str | None, split: str) -> list[Record]:
    import datasets

    try:
        data = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # datasets raises many types: missing, offline, bad split
        offline = " (HF_HUB_OFFLINE is set: only cached datasets load)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise DatasetInvalid(f"hub dataset {name} (split {split}) could not be loaded{offline}: {err}") from None
    return [Record(f"row {i}", r) for i, r in enumerate(data, 1)]


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# ---------------------------------------------------------------- shapes


def detect_format(columns: Iterable[str], fields: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The format the columns look like, and the canonical-to-column mapping to read it with."""
    columns = set(columns)
    fields = dict(fields or {})
    for fmt, needed in FORMAT_COLUMNS.items():
        mapping = {}
        for name in needed:
            if name in fields:
                candidates = (fields[name],)
            else:
                candidates = (name, *ALIASES.get(name, ()))
            found = next((c for c in candidates if c in columns), None)
            if found is None:
                break
            mapping[name] = found
        else:
            if fmt == "instruction":
                mapping["input"] = fields.get("input", "input")
            return fmt, {**fields, **mapping}
    raise DatasetInvalid(
        f"cannot detect the dataset format from the columns {sorted(columns)}: expected question/answer (qa), "
        "instruction/output (instruction), messages (chat) or text (text); set dataset.format and "
        "dataset.fields (e.g. {question: q, answer: a})"
    )


def _text_field(record: Record, data: dict, canonical: str, fields: dict, required: bool = True) -> str:
    column = fields.get(canonical, canonical)
    value = data.get(column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or value == "":
        if not required:
            return ""
        if column not in data:
            raise DatasetInvalid(f"{record.where}: field `{column}` is missing; expected a non-empty string")
        raise DatasetInvalid(f"{record.where}: field `{column}`: expected a non-empty string, got {_kind(value) if value is None else 'an empty string'}")
    if not isinstance(value, str):
        raise DatasetInvalid(f"{record.where}: field `{column}`: expected a string, got {_kind(value)}")
    return value


def nfc(text: str) -> str:
    """`text` in Unicode's composed form (NFC). Files exported on macOS often hold Korean in decomposed form
    (NFD), which tokenizes jamo by jamo, unlike the composed text a model meets at inference."""
    return unicodedata.normalize("NFC", text)


def to_example(record: Record, fmt: str, fields: dict[str, str], system_prompt: str | None) -> list[dict] | str:
    """A record as chat messages (qa, instruction, chat) or as plain text (text), in NFC; wrong shapes fail."""
    example = _example(record, fmt, fields, system_prompt)
    if isinstance(example, str):
        return nfc(example)
    return [{**message, "content": nfc(message["content"])} for message in example]


def _example(record: Record, fmt: str, fields: dict[str, str], system_prompt: str | None) -> list[dict] | str:
    data = record.data
    if fmt == "text":
        return _text_field(record, data, "text", fields)
    if fmt == "qa":
        messages = [
            {"role": "user", "content": _text_field(record, data, "question", fields)},
            {"role": "assistant", "content": _text_field(record, data, "answer", fields)},
        ]
    elif fmt == "instruction":
        prompt = _text_field(record, data, "instruction", fields)
        extra = _text_field(record, data, "input", fields, required=False)
        messages = [
            {"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
            {"role": "assistant", "content": _text_field(record, data, "output", fields)},
        ]
    else:
        messages = _chat_messages(record, fields)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _chat_messages(record: Record, fields: dict[str, str]) -> list[dict]:
    column = fields.get("messages", "messages")
    raw = record.data.get(column)
    if isinstance(raw, str):  # CSV and some exports keep the list as a JSON string
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            pass
    if not isinstance(raw, list) or not raw:
        raise DatasetInvalid(
            f"{record.where}: field `{column}`: expected a non-empty list of {{role, content}} messages, "
            f"got {_kind(raw)}"
        )
    role_key, content_key = fields.get("role", "role"), fields.get("content", "content")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DatasetInvalid(f"{record.where}: field `{column}[{i}]`: expected an object, got {_kind(message)}")
        role, content = message.get(role_key), message.get(content_key)
        if role not in ROLES:
            raise DatasetInvalid(
                f"{record.where}: field `{column}[{i}].{role_key}`: expected one of {', '.join(ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise DatasetInvalid(
                f"{record.where}: field `{column}[{i}].{content_key}`: expected a string, got {_kind(content)}"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetInvalid(f"{record.where}: field `{column}`: expected at least one assistant message to learn")
    return messages


# ---------------------------------------------------------------- encoding


def renderer(tokenizer) -> Callable[[list[dict], bool], str]:
    """`render(messages, add_generation_prompt)` with the tokenizer's chat template, or `PLAIN_TEMPLATE`."""
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )

    return render


def answer_spans(render: Callable[[list[dict], bool], str], messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (the tokens that carry loss).

    A turn's span runs from the end of the conversation rendered up to it with the generation prompt to the
    end of the conversation rendered through it, so it includes the template's end-of-turn marker. Templates
    that rewrite earlier turns (the prefixes don't line up) fall back to the last answer only.
    """
    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix, through = render(messages[:i], True), render(messages[: i + 1], False)
        if full.startswith(prefix) and full.startswith(through) and len(through) > len(prefix):
            spans.append((len(prefix), len(through)))
    if not spans:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = render(messages[:last], True)
        start = len(os.path.commonprefix([prompt, full]))
        spans = [(start, len(full))]
    return full, spans


def encode(tokenizer, render, example: list[dict] | str, max_length: int) -> tuple[dict[str, list[int]], bool]:
    """Token ids, attention mask and labels (answer tokens only; all tokens for text), truncated to
    `max_length`; the flag says whether it was truncated."""
    if isinstance(example, str):
        text = example + (tokenizer.eos_token or "")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        labels = list(ids)
    else:
        text, spans = answer_spans(render, example)
        ids, labels = _tokenize_with_spans(tokenizer, text, spans)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, truncated


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(ids, encoded["offset_mapping"])
        ]
        return ids, labels
    # Slow tokenizers have no offsets: tokenize prompt and answer pieces one after another.
    ids, labels, position = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, learn in ((text[position:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
        position = end
    return ids, labels


def split_indices(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and eval record indices: a seeded shuffle, the first `eval_fraction` held out (at least one
    record when the fraction is above 0 and there are two or more records)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = round(count * eval_fraction)
    if eval_fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    else:
        held = 0
    return sorted(order[held:]), sorted(order[:held])


def prepare_data(cfg: DatasetConfig, tokenizer, max_length: int, seed: int) -> PreparedData:
    """Read, check, split and encode the configured data set."""
    records = read_records(cfg)
    if cfg.format == "auto":
        fmt, fields = detect_format(records[0].data.keys(), cfg.fields)
    else:
        fmt, fields = cfg.format, dict(cfg.fields or {})
        if fmt == "instruction":
            fields.setdefault("input", "input")
    examples = [to_example(r, fmt, fields, cfg.system_prompt) for r in records]
    render = renderer(tokenizer)
    stats = DataStats(format=fmt, records=len(records))
    train_idx, eval_idx = split_indices(len(examples), cfg.eval_fraction, seed)

    def encode_all(indices: list[int]) -> list[dict[str, list[int]]]:
        encoded = []
        for i in indices:
            item, truncated = encode(tokenizer, render, examples[i], max_length)
            stats.truncated += truncated
            answer = sum(label != IGNORE_INDEX for label in item["labels"][1:])
            if answer == 0:  # the prompt filled max_length: nothing left to learn from
                stats.skipped_no_answer += 1
                continue
            stats.answer_tokens += answer
            stats.tokens += len(item["input_ids"])
            encoded.append(item)
        return encoded

    train, evaluation = encode_all(train_idx), encode_all(eval_idx)
    stats.train_examples, stats.eval_examples = len(train), len(evaluation)
    if not train:
        raise DatasetInvalid(
            f"no trainable examples: all {len(train_idx)} training records lost their answer to truncation at "
            f"training.maxLength={max_length}; raise training.maxLength"
        )
    if stats.truncated:
        log.warning(
            "%d of %d examples were longer than training.maxLength=%d tokens and were truncated",
            stats.truncated, len(examples), max_length,
        )
    return PreparedData(train, evaluation, stats)


# ---------------------------------------------------------------- batches


# What DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds: each example's boundaries in the row.
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def collator(tokenizer, packing: bool, boundaries: bool = False):
    """Padded batches, or with `packing` every example of the batch in one row: position ids restart per
    example and the first label of each is masked, so attention and loss stay per example. With `boundaries`
    a packed batch also carries each example's boundaries (`BOUNDARY_KEYS`), as varlen attention reads them,
    worked out on the CPU while collating: the GPU step then reads nothing back to find them."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=boundaries
        )
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def split_packed(batch: dict, token_budget: int) -> list[dict]:
    """Cut a packed one-row batch at example boundaries into micro-batches of at most `token_budget` tokens
    (an example longer than the budget gets one to itself). A row within the budget is returned as it is,
    without reading its positions back from the GPU; cut parts leave out the whole row's `BOUNDARY_KEYS` (the
    attention works each part's out from its position ids)."""
    positions = batch["position_ids"][0]
    if positions.numel() <= token_budget:
        return [batch]
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    chunks, begin = [], 0
    for here, after in zip(starts[1:-1], starts[2:]):
        if after - begin > token_budget:
            chunks.append((begin, here))
            begin = here
    chunks.append((begin, starts[-1]))
    if len(chunks) == 1:
        return [batch]
    row = {k: v for k, v in batch.items() if k not in BOUNDARY_KEYS}
    return [{k: (v[:, a:b] if hasattr(v, "dim") and v.dim() == 2 else v) for k, v in row.items()} for a, b in chunks]
