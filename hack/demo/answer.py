#!/usr/bin/env python3
"""Ask the base model a question, then the same model with the trained adapter: one answer before, one after.

    python hack/demo/answer.py --model MODEL_FOLDER --adapter ADAPTER_FOLDER "question"

Greedy decoding, CPU, the tokenizer's chat template; the adapter is loaded with peft onto the base model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def answer(model, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    import torch

    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def before_and_after(model_dir: Path, adapter_dir: Path, question: str) -> tuple[str, str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer.json").exists() else model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = answer(base, tokenizer, question)
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
    after = answer(tuned, tokenizer, question)
    return before, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the base model's folder")
    parser.add_argument("--adapter", type=Path, required=True, help="the trained adapter's folder")
    parser.add_argument("question")
    args = parser.parse_args(argv)
    for folder, what in ((args.model, "model"), (args.adapter, "adapter")):
        if not folder.is_dir():
            print(f"answer: the {what} folder {folder} does not exist", file=sys.stderr)
            return 1
    before, after = before_and_after(args.model, args.adapter, args.question)
    print(f"  Q:      {args.question}")
    print(f"  before: {before or '(nothing)'}")
    print(f"  after:  {after or '(nothing)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
