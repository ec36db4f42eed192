"""qlora_operator: a kopf operator that runs QLoRAFinetune resources as GPU Jobs and keeps their status current."""

__version__ = "0.1.0"
