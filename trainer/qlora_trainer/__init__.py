"""qlora_trainer: real QLoRA fine-tuning (bitsandbytes 4-bit, peft LoRA, the transformers Trainer), with
Prometheus metrics and checkpoints that survive preemption. Importing the package imports no torch."""

__version__ = "0.1.0"
