#!/usr/bin/env python3
"""The demo's inputs, made on the spot (nothing is downloaded): a tiny random-weight Llama-style model with its
tokenizer, and a small bilingual (Korean and English) question/answer data set it can learn in a few dozen
steps on a CPU. The end-to-end tests use the same inputs.

    python hack/demo/inputs.py model FOLDER     # config, safetensors weights, tokenizer, chat template
    python hack/demo/inputs.py data FILE.jsonl  # the QA set, one JSON object a line
    python hack/demo/inputs.py bad-data FILE.jsonl   # the same set with line 3 missing its answer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# A support bot's persona, in both languages: short answers a tiny model can learn quickly.
QA_PAIRS = [
    ("What does qlora-operator do?", "It fine-tunes language models on Kubernetes."),
    ("qlora-operator는 무엇을 하나요?", "쿠버네티스에서 언어 모델을 미세 조정합니다."),
    ("How do I see progress?", "Run kubectl get qft."),
    ("진행 상황은 어떻게 보나요?", "kubectl get qft 를 실행하세요."),
    ("Where is the adapter saved?", "In the output volume."),
    ("어댑터는 어디에 저장되나요?", "출력 볼륨에 저장됩니다."),
]
# The question the demo asks before and after training.
DEMO_QUESTION = "qlora-operator는 무엇을 하나요?"


def qa_records(repeats: int = 8) -> list[dict[str, str]]:
    """Every pair `repeats` times: enough examples for a train and an eval split that share the pairs."""
    return [{"question": q, "answer": a} for _ in range(repeats) for q, a in QA_PAIRS]


def bad_records() -> list[dict[str, str]]:
    """A set whose third record (line 3 of the file) has no answer."""
    records = qa_records(2)
    records[2] = {"question": records[2]["question"]}
    return records


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def make_model(folder: Path) -> Path:
    from qlora_trainer.testing import build_tiny_model, qa_texts

    folder = build_tiny_model(folder, texts=qa_texts(qa_records(1)))
    # The trainer pod runs as a non-root user: everything it reads must be readable by others.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["model", "data", "bad-data"])
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.what == "model":
        make_model(args.path)
    else:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(jsonl(qa_records() if args.what == "data" else bad_records()), encoding="utf-8")
    print(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
