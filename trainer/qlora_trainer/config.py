"""The trainer's configuration: the model, dataset, quantization, lora and training sections of a
`QLoRAFinetune` (shared/API.md), plus what only a running trainer needs (local paths, metrics port).

Torch-free on purpose: the operator imports these models to build the trainer's config and to generate
the CRD schema, and its image installs no torch. Field names are snake_case in Python and camelCase on the
wire (YAML, JSON, the CRD), exactly as API.md spells them. Every field carries the description that
`kubectl explain` prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_BASE_MODEL = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
MAX_INLINE_RECORDS = 500


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase document, without fields left unset (None)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


NonEmpty = Annotated[str, Field(min_length=1)]


class ModelSource(ApiModel):
    name: str = Field(
        DEFAULT_BASE_MODEL,
        min_length=1,
        description="Hugging Face repo id of the base model, or a local folder holding it.",
    )
    revision: str = Field("main", min_length=1, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the model (EXAONE 3.x needs it). Off unless you opt in.",
    )


class HFDataset(ApiModel):
    name: NonEmpty = Field(description="Hub dataset id, e.g. `org/dataset`.")
    split: NonEmpty = Field("train", description="Split to train on.")
    subset: str | None = Field(None, description="Dataset configuration (subset) name, if it has several.")


DatasetFormat = Literal["auto", "qa", "instruction", "chat", "text"]


class DatasetOptions(ApiModel):
    """How records are read, whatever their source."""

    format: DatasetFormat = Field(
        "auto",
        description=(
            "Record shape: `qa` (question/answer), `instruction` (instruction/input/output), `chat` "
            "(`messages` lists), `text` (raw text); `auto` detects it from the columns."
        ),
    )
    fields: dict[str, NonEmpty] | None = Field(
        None,
        description="Column renames from the canonical name to yours, e.g. `{question: q, answer: a}`.",
    )
    system_prompt: str | None = Field(
        None, description="System message put in front of every example (a persona, say)."
    )
    eval_fraction: float = Field(
        0.05, ge=0, le=0.5, description="Fraction of records held out for the evaluation loss (0 to 0.5)."
    )


class DatasetConfig(DatasetOptions):
    """The trainer's data: a local file, a hub dataset, or records given inline (exactly one)."""

    path: str | None = Field(
        None, min_length=1, description="Local file: JSON Lines, JSON, CSV or Parquet."
    )
    hf: HFDataset | None = Field(None, description="A hub dataset.")
    inline: list[dict[str, Any]] | None = Field(
        None,
        max_length=MAX_INLINE_RECORDS,
        description=f"Records given inline (at most {MAX_INLINE_RECORDS}).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        given = [name for name in ("path", "hf", "inline") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"dataset: give exactly one of path, hf, inline (got {', '.join(given) or 'none'})"
            )
        return self


class QuantizationConfig(ApiModel):
    bits: Literal[4, 8] = Field(4, description="Bits per frozen base weight: 4 (QLoRA) or 8.")
    # No schema default: a defaulted `nf4` would make every 8-bit resource break the 4-bit-only rule.
    type: Literal["nf4", "fp4"] | None = Field(
        None, description="4-bit data type: `nf4` (the default) or `fp4`; only with bits 4."
    )
    double_quant: bool = Field(True, description="Quantize the quantization constants too (4-bit only).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Data type of the matrix products."
    )

    @model_validator(mode="after")
    def _type_only_with_4_bits(self) -> QuantizationConfig:
        if self.bits != 4 and self.type is not None:
            raise ValueError("quantization.type: only applies to 4-bit quantization (bits: 4)")
        return self

    @property
    def quant_type(self) -> str:
        """The 4-bit data type in effect."""
        return self.type or "nf4"


class LoraConfig(ApiModel):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank (1 to 1024).")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (greater than 0).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input (0 to below 1).")
    target_modules: list[NonEmpty] | Literal["all-linear"] | None = Field(
        None,
        description=(
            "Modules that get adapters: a list of names, or `all-linear`. Empty means the attention "
            "projections of the model's architecture, found automatically."
        ),
    )
    use_rslora: bool = Field(True, description="Rank-stabilised scaling (alpha / sqrt(r)).")
    init: Literal["gaussian", "default", "pissa", "olora", "loftq", "eva"] = Field(
        "gaussian", description="How the LoRA weights start."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")


Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
Tracker = Literal["tensorboard", "wandb", "mlflow"]


class TrainingConfig(ApiModel):
    epochs: int = Field(3, ge=1, description="Passes over the training data (at least 1).")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run; wins over `epochs` when set."
    )
    batch_size: int | Literal["auto"] = Field(
        2,
        description=(
            "Micro-batch per GPU in examples (at least 1), or `auto` for the largest that fits the GPU. "
            "The optimizer batch is batchSize x gradientAccumulationSteps examples."
        ),
    )
    gradient_accumulation_steps: int = Field(8, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate (above 0, at most 1).")
    scheduler: Scheduler = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up.")
    optimizer: NonEmpty = Field(
        "paged_adamw_8bit",
        description="Optimizer name as the transformers Trainer knows it (`paged_adamw_8bit`, `adamw_torch_fused`, ...).",
    )
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm (above 0).")
    weight_decay: float = Field(0.01, ge=0, description="Weight decay (0 or more).")
    max_length: int = Field(
        1024, ge=16, le=131072, description="Tokens per example; longer ones are truncated and counted."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations to save memory.")
    packing: bool = Field(
        True, description="Pack examples without padding: the same loss, far fewer wasted tokens."
    )
    seed: int = Field(42, description="Random seed for data order, the eval split and LoRA init.")
    report_to: list[Tracker] | None = Field(
        None,
        description="Extra experiment trackers; Prometheus metrics are always on.",
    )
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")
    eval_every: int = Field(50, ge=1, description="Optimizer steps between evaluations.")

    @model_validator(mode="after")
    def _batch_size_bound(self) -> TrainingConfig:
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError("training.batchSize: must be at least 1 or `auto`")
        return self


class OutputConfig(ApiModel):
    dir: NonEmpty = Field(description="Folder for the adapter, tokenizer, checkpoints and summary.json.")
    merge_adapter: bool = Field(False, description="Also write a merged full-precision model.")


class MetricsConfig(ApiModel):
    port: int = Field(9090, ge=0, le=65535, description="Port of the Prometheus endpoint (0: off).")
    host: str | None = Field(
        None, description="Address to bind; defaults to $POD_IP when set, else all interfaces."
    )


class TrainerConfig(ApiModel):
    """Everything one trainer run needs; the document of `python -m qlora_trainer --config`."""

    model: ModelSource = Field(default_factory=ModelSource)
    dataset: DatasetConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    gpus: int = Field(1, ge=0, description="GPUs this process may use; 0 runs on the CPU.")
    termination_message_path: str = Field(
        "/dev/termination-log", description="Where the exit summary is written."
    )


def load_config(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> TrainerConfig:
    """Read the config from a JSON or YAML file, or from the QLORA_CONFIG environment variable."""
    env = os.environ if env is None else env
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
    elif env.get("QLORA_CONFIG"):
        text = env["QLORA_CONFIG"]
    else:
        raise ValueError("no config: pass --config FILE or set QLORA_CONFIG")
    # YAML is a superset of JSON, but json gives better errors for what looks like JSON.
    document = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    if not isinstance(document, dict):
        raise ValueError("config: expected a mapping at the top level")
    return TrainerConfig.model_validate(document)
