"""The `QLoRAFinetune` API (shared/API.md): pydantic models of spec and status, and the resource's names.

One source of truth: `crdgen` turns these models into the CRD's schema, the operator parses resources with
them. The trainer-facing sections (model, dataset, quantization, lora, training) are the trainer's own config
models, reused or extended, never copied. CEL rules live next to the fields they check, through `rule()`.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints, model_validator
from qlora_trainer.config import (
    MAX_INLINE_RECORDS,
    ApiModel,
    DatasetOptions,
    HFDataset,
    LoraConfig,
    ModelSource,
    QuantizationConfig,
    TrainingConfig,
)

GROUP = "qlora.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "QLoRAFinetune"
LIST_KIND = "QLoRAFinetuneList"
PLURAL = "qlorafinetunes"
SINGULAR = "qlorafinetune"
SHORT_NAMES = ("qft", "qlora")
CATEGORIES = ("all", "ml")
CRD_NAME = f"{PLURAL}.{GROUP}"

# Spec fields that may change after creation; everything else is fixed for the life of the run.
MUTABLE_AFTER_CREATE = ("suspend", "runtime.ttlSecondsAfterFinished", "runtime.activeDeadlineSeconds")
RERUN_HINT = "to train with other settings, apply the resource again under a new metadata.name"

PRINTER_COLUMNS = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the run is."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress", "description": "Steps done, in percent."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss", "description": "Last training loss."},
    {"name": "Epoch", "type": "number", "jsonPath": ".status.epoch", "description": "Current epoch (fractional)."},
    {"name": "ETA", "type": "string", "jsonPath": ".status.eta", "description": "Estimated time left."},
    {
        "name": "Model",
        "type": "string",
        "jsonPath": ".status.model.name",
        "description": "Base model in use.",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)


def rule(expression: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One CEL `x-kubernetes-validations` entry; `field_path` points the error at a child field."""
    entry = {"rule": expression, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def rules(*entries: dict[str, str]) -> dict[str, Any]:
    """The `json_schema_extra` that attaches CEL rules to a field or model."""
    return {"x-kubernetes-validations": list(entries)}


# The optimizer names of transformers' Trainer (OptimizerNames of the pinned release; a unit test compares).
TRAINER_OPTIMIZERS = (
    "adafactor", "adagrad", "adalomo", "ademamix", "ademamix_8bit", "adamw_8bit", "adamw_anyprecision",
    "adamw_bnb_8bit", "adamw_torch", "adamw_torch_4bit", "adamw_torch_8bit", "adamw_torch_fused",
    "adamw_torch_npu_fused", "adamw_torch_xla", "apollo_adamw", "apollo_adamw_layerwise", "galore_adafactor",
    "galore_adafactor_layerwise", "galore_adamw", "galore_adamw_8bit", "galore_adamw_8bit_layerwise",
    "galore_adamw_layerwise", "grokadamw", "lion_32bit", "lion_8bit", "lomo", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop", "rmsprop_bnb", "rmsprop_bnb_32bit", "rmsprop_bnb_8bit", "schedule_free_adamw",
    "schedule_free_radam", "schedule_free_sgd", "sgd", "stable_adamw",
)


# --- small reusable types -------------------------------------------------------------------------

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
# Env names that hold a credential: a literal value would sit in the resource for anyone who can read it.
SECRET_ENV_NAME = r"(?i)(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)"

ObjectName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL)]
ConfigKey = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=CONFIG_KEY)]
Quantity = int | Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY)]


RELATIVE_PATH_MESSAGE = "must be a path relative to the volume's root, without '..'"


def _relative_path(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError(RELATIVE_PATH_MESSAGE)
    return value


RelativePath = Annotated[
    str,
    StringConstraints(min_length=1, max_length=1024),
    AfterValidator(_relative_path),
    Field(
        json_schema_extra=rules(
            rule(
                "!self.startsWith('/') && !self.split('/').exists(p, p == '..')", RELATIVE_PATH_MESSAGE
            )
        )
    ),
]


class ConfigMapKey(ApiModel):
    """A key of a ConfigMap in the resource's namespace."""

    name: ObjectName = Field(description="ConfigMap name.")
    key: ConfigKey = Field(description="Key whose value is the data, e.g. `data.jsonl`.")


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's namespace."""

    name: ObjectName = Field(description="Secret name.")
    key: ConfigKey = Field("HF_TOKEN", description="Key holding the token.")


class VolumeFolder(ApiModel):
    """A folder of a PersistentVolumeClaim in the resource's namespace."""

    claim_name: ObjectName = Field(description="PersistentVolumeClaim name.")
    path: RelativePath | None = Field(
        None, description="Folder inside the volume, relative to its root; the root when unset."
    )


class VolumeFile(ApiModel):
    """A file on a PersistentVolumeClaim in the resource's namespace."""

    claim_name: ObjectName = Field(description="PersistentVolumeClaim name.")
    path: RelativePath = Field(
        description="File inside the volume, relative to its root: JSON Lines, JSON, CSV or Parquet."
    )


# --- spec -----------------------------------------------------------------------------------------


class ModelSpec(ModelSource):
    """The base model: a hub repo id, or a folder of a volume."""

    # No schema default: the operator fills it from its Helm value `defaults.baseModel` (status.model).
    name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description=(
            "Hugging Face repo id of the base model; the operator's default (Helm value defaults.baseModel, "
            "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct) when unset. With `pvc`, only the run's label."
        ),
    )
    pvc: VolumeFolder | None = Field(
        None, description="Load the base model from this folder of a volume instead of the hub."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "Secret with the hub token (key HF_TOKEN unless set); never copied into a ConfigMap, status, "
            "event or log."
        ),
    )


DATASET_SOURCES = ("configMap", "pvc", "hf", "inline")
_SOURCES_TEXT = "dataset.configMap, dataset.pvc, dataset.hf or dataset.inline"


def _count_sources(cel_self: str = "self") -> str:
    return " + ".join(f"(has({cel_self}.{name}) ? 1 : 0)" for name in DATASET_SOURCES)


def _dataset_schema(schema: dict[str, Any]) -> None:
    schema.update(
        rules(
            rule(f"{_count_sources()} >= 1", f"no dataset source: set one of {_SOURCES_TEXT}"),
            rule(f"{_count_sources()} <= 1", f"more than one dataset source: keep only one of {_SOURCES_TEXT}"),
        )
    )
    # A persona prompt is longer than the default bound of free text.
    schema["properties"]["systemPrompt"]["maxLength"] = 16384


class DatasetSpec(DatasetOptions):
    """The training data: exactly one of configMap, pvc, hf, inline, and how to read its records."""

    model_config = {"json_schema_extra": _dataset_schema}

    config_map: ConfigMapKey | None = Field(
        None, description="A ConfigMap key holding the records (JSON Lines or JSON), e.g. `data.jsonl`."
    )
    pvc: VolumeFile | None = Field(None, description="A file on a volume: JSON Lines, JSON, CSV or Parquet.")
    hf: HFDataset | None = Field(None, description="A Hugging Face hub dataset.")
    inline: list[dict[str, Any]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_INLINE_RECORDS,
        description=f"Records given in the resource itself, at most {MAX_INLINE_RECORDS}.",
    )
    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        given = [name for name in DATASET_SOURCES if getattr(self, _snake(name)) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {_SOURCES_TEXT} (got {', '.join(given) or 'none'})")
        return self


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


class ResourcesSpec(ApiModel):
    """What each pod gets and where it may run."""

    gpus: int = Field(
        1,
        ge=0,
        le=64,
        description="GPUs per pod; more than one runs data-parallel; 0 runs on the CPU (tests, demos).",
    )
    nodes: int = Field(
        1, ge=1, le=256, description="Pods; more than one runs multi-node (Indexed Job + headless Service)."
    )
    gpu_resource_name: str = Field(
        "nvidia.com/gpu",
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._a-zA-Z0-9]+$",
        description="Extended resource name of the GPUs, e.g. `nvidia.com/gpu`.",
    )
    cpu: Quantity | None = Field(
        None, description="CPU request of each pod, e.g. `8` or `7500m` (no limit: throttling only slows the GPU)."
    )
    memory: Quantity | None = Field(None, description="Memory request and limit of each pod, e.g. `48Gi`.")
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] | None = Field(
        None, description="Node labels the pods must match (pod spec nodeSelector)."
    )
    tolerations: list[dict[str, Any]] | None = Field(
        None, max_length=32, description="Pod tolerations, as in a pod spec (core/v1 Toleration)."
    )
    affinity: dict[str, Any] | None = Field(
        None, description="Pod affinity, as in a pod spec (core/v1 Affinity)."
    )
    priority_class_name: ObjectName | None = Field(None, description="PriorityClass of the pods.")


class OutputSpec(ApiModel):
    """Where the results go."""

    pvc: VolumeFolder = Field(
        description="Folder of a volume for the adapter, tokenizer, checkpoints and summary.json."
    )
    merge_adapter: bool = Field(False, description="Also write a merged full-precision model.")


class LocalObjectReference(ApiModel):
    name: ObjectName = Field(description="Name of the object in the resource's namespace.")


class KeySelector(ApiModel):
    name: ObjectName = Field(description="Name of the object in the resource's namespace.")
    key: ConfigKey = Field(description="Key within it.")
    optional: bool | None = Field(None, description="Whether the pod starts without it.")


class ObjectFieldSelector(ApiModel):
    field_path: str = Field(min_length=1, max_length=256, description="Pod field, e.g. `metadata.name`.")
    api_version: str | None = Field(None, max_length=64, description="Schema version of fieldPath.")


class ResourceFieldSelector(ApiModel):
    resource: str = Field(min_length=1, max_length=64, description="Container resource, e.g. `limits.memory`.")
    container_name: str | None = Field(None, max_length=63, description="Container; the trainer when unset.")
    divisor: Quantity | None = Field(None, description="Unit of the exposed value.")


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from (exactly one)."""

    model_config = {
        "json_schema_extra": rules(
            rule(
                "(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0)"
                " + (has(self.fieldRef) ? 1 : 0) + (has(self.resourceFieldRef) ? 1 : 0) == 1",
                "set exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef",
            )
        )
    }

    secret_key_ref: KeySelector | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: KeySelector | None = Field(None, description="A key of a ConfigMap.")
    field_ref: ObjectFieldSelector | None = Field(None, description="A field of the pod.")
    resource_field_ref: ResourceFieldSelector | None = Field(None, description="A resource of the container.")


class EnvVar(ApiModel):
    """An environment variable of the trainer container (core/v1 EnvVar)."""

    model_config = {
        "json_schema_extra": rules(
            rule(
                "!(has(self.value) && has(self.valueFrom))",
                "set value or valueFrom, not both",
            ),
            rule(
                f"!has(self.value) || !self.name.matches('{SECRET_ENV_NAME}')",
                "looks like a credential: give it through valueFrom.secretKeyRef, not a literal value",
                ".value",
            ),
            rule(
                "!self.name.startsWith('QLORA_')",
                "names starting with QLORA_ are set by the operator",
                ".name",
            ),
        )
    }

    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME, description="Variable name.")
    value: str | None = Field(None, max_length=32768, description="Literal value (never a credential).")
    value_from: EnvVarSource | None = Field(None, description="Take the value from a Secret, ConfigMap or field.")

    @model_validator(mode="after")
    def _no_literal_credential(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        if self.value is not None and re.search(SECRET_ENV_NAME, self.name):
            raise ValueError(f"{self.name} looks like a credential: give it through valueFrom.secretKeyRef")
        if self.name.startswith("QLORA_"):
            raise ValueError("names starting with QLORA_ are set by the operator")
        return self


class RuntimeSpec(ApiModel):
    """How the trainer runs: image, identity, environment, retries, lifetime, queue."""

    image: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="Trainer image; the operator's default (Helm value trainer.image) when unset.",
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None, max_length=16, description="Secrets for pulling the image."
    )
    service_account_name: ObjectName | None = Field(None, description="ServiceAccount of the pods.")
    env: list[EnvVar] | None = Field(
        None,
        max_length=64,
        description=(
            "Extra environment of the trainer (tracker settings, say); credentials only through "
            "valueFrom.secretKeyRef."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Retries of a failed pod; each retry resumes from the last checkpoint."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Seconds the run may take before it fails with DeadlineExceeded."
    )
    rendezvous_timeout_seconds: int = Field(
        600,
        ge=10,
        le=86400,
        description=(
            "Multi-node runs: seconds the pods wait for each other at start; a pod whose peer never starts then "
            "fails with RendezvousTimeout, a failure the Job retries."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Seconds after the run ends before its Job and pods are deleted."
    )
    queue_name: LabelName | None = Field(
        None,
        description="Kueue LocalQueue; the Job is created suspended and labelled for Kueue to admit.",
    )


def _section(model: type[ApiModel], description: str, *cel: dict[str, str]) -> Any:
    """A spec section that is optional and defaults to all its fields' defaults, on the API server too."""
    extra: dict[str, Any] = {"default": {}}
    if cel:
        extra.update(rules(*cel))
    return Field(default_factory=model, description=description, json_schema_extra=extra)


def _immutability(schema: dict[str, Any]) -> None:
    """Transition rules: every spec field but MUTABLE_AFTER_CREATE keeps its value after creation."""
    entries = schema.setdefault("x-kubernetes-validations", [])
    for field_name in schema["properties"]:
        mutable_children = [p.split(".", 1)[1] for p in MUTABLE_AFTER_CREATE if p.startswith(field_name + ".")]
        if field_name in MUTABLE_AFTER_CREATE:
            continue
        if not mutable_children:
            paths = [field_name]
        else:
            model = QLoRAFinetuneSpec.model_fields[_snake(field_name)].annotation
            children = [f.alias or name for name, f in model.model_fields.items()]
            paths = [f"{field_name}.{child}" for child in children if child not in mutable_children]
        for path in paths:
            # `has` guards rather than optional `.?` selection, whose cost the API server cannot bound.
            now, before = f"self.{path}", f"oldSelf.{path}"
            entries.append(
                rule(
                    f"has({now}) == has({before}) && (!has({now}) || {now} == {before})",
                    f"spec.{path} cannot change after creation; {RERUN_HINT}",
                    f".{path}",
                )
            )


class QLoRAFinetuneSpec(ApiModel):
    """What to fine-tune, on what, how, and where the adapter goes."""

    model_config = {"json_schema_extra": _immutability}

    model: ModelSpec = _section(ModelSpec, "The base model: a hub repo id, or a folder of a volume.")
    dataset: DatasetSpec = Field(
        description="The training data: exactly one of configMap, pvc, hf, inline, and how to read it."
    )
    quantization: QuantizationConfig = _section(
        QuantizationConfig,
        "How the frozen base weights are quantized (bitsandbytes); NF4 4-bit with double quantization by default.",
        rule(
            "!has(self.type) || self.bits == 4",
            "quantization.type applies to 4-bit only: remove it, or set bits: 4",
            ".type",
        ),
    )
    lora: LoraConfig = _section(
        LoraConfig, "The LoRA adapter: rank, scaling, dropout, target modules, initialisation."
    )
    training: TrainingConfig = _section(
        TrainingConfig,
        "The training loop: epochs or steps, batch, learning rate and schedule, optimizer, lengths.",
        rule(
            "!has(self.batchSize) || type(self.batchSize) != int || self.batchSize >= 1",
            "training.batchSize must be at least 1, or auto",
            ".batchSize",
        ),
        rule(
            "!has(self.optimizer) || self.optimizer in [" + ", ".join(f"'{name}'" for name in TRAINER_OPTIMIZERS) + "]",
            "training.optimizer is not an optimizer the transformers Trainer knows; "
            "use paged_adamw_8bit, adamw_torch_fused, adamw_torch, adafactor, ...",
            ".optimizer",
        ),
    )
    resources: ResourcesSpec = _section(ResourcesSpec, "GPUs, nodes and placement of the trainer pods.")
    output: OutputSpec = Field(description="Where the adapter, checkpoints and summary.json are written.")
    runtime: RuntimeSpec = _section(
        RuntimeSpec, "How the trainer runs: image, environment, retries, deadline, clean-up, queue."
    )
    suspend: bool = Field(
        False, description="Suspend the run: pods stop and progress is kept; false resumes from the checkpoint."
    )


# --- status ---------------------------------------------------------------------------------------


class Phase(str, enum.Enum):
    """Where the run is (status.phase)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    # The Job is gone and what became of it cannot be known (deleted, or removed by its TTL while the
    # operator was away): never reported as a failure, which it may not have been.
    UNKNOWN = "Unknown"


class ConditionType(str, enum.Enum):
    SPEC_VALID = "SpecValid"
    JOB_CREATED = "JobCreated"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    SUSPENDED = "Suspended"


class Reason(str, enum.Enum):
    """Failure reasons a user sees in the Succeeded=False condition and as an Event."""

    INVALID_SPEC = "InvalidSpec"
    SECRET_NOT_FOUND = "SecretNotFound"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_ERROR = "ImagePullError"
    CUDA_OUT_OF_MEMORY = "CUDAOutOfMemory"
    OOM_KILLED = "OOMKilled"
    DATASET_INVALID = "DatasetInvalid"
    MODEL_LOAD_FAILED = "ModelLoadFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"


class Condition(ApiModel):
    """One aspect of the run's state (Kubernetes API conventions)."""

    type: str = Field(
        min_length=1,
        max_length=64,
        description="SpecValid, JobCreated, Running, Succeeded or Suspended.",
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z]([A-Za-z0-9]*)$",
        description="Why, in one CamelCase word.",
    )
    message: str = Field("", max_length=4096, description="What happened, for a person.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation this condition was computed from."
    )


class ResolvedModel(ApiModel):
    name: str = Field(max_length=256, description="Base model in use (the spec's, or the operator's default).")
    revision: str = Field(max_length=256, description="Hub revision in use.")


class Checkpoint(ApiModel):
    step: int = Field(ge=0, description="Optimizer step of the checkpoint.")
    path: str = Field(max_length=1024, description="Folder of the checkpoint on the output volume.")


class QLoRAFinetuneStatus(ApiModel):
    """What the operator observed; written by the operator only."""

    phase: Phase | None = Field(
        None, description="Pending, Running, Succeeded, Failed, Suspended, or Unknown (the Job is gone and its "
        "outcome unknown).")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="SpecValid, JobCreated, Running, Succeeded, Suspended.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="The metadata.generation last acted on.")
    job_name: str | None = Field(None, max_length=253, description="Name of the Job that runs the trainer.")
    model: ResolvedModel | None = Field(None, description="The base model in use, after the operator's defaults.")
    start_time: datetime | None = Field(None, description="When the first trainer pod started.")
    completion_time: datetime | None = Field(None, description="When the run succeeded or failed.")
    progress: str | None = Field(None, max_length=16, description="Share of the steps done, like `42%`.")
    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps planned.")
    epoch: float | None = Field(None, ge=0, description="Current epoch, fractional.")
    loss: float | None = Field(None, description="Last training loss.")
    eval_loss: float | None = Field(None, description="Last evaluation loss.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    grad_norm: float | None = Field(None, description="Last gradient norm.")
    tokens_per_second: float | None = Field(None, ge=0, description="Training throughput, tokens per second.")
    gpu_memory_peak_bytes: int | None = Field(None, ge=0, description="Peak GPU memory of rank 0, bytes.")
    eta: str | None = Field(None, max_length=32, description="Estimated time left, like `3m12s`.")
    estimated_completion_time: datetime | None = Field(None, description="When the run should end.")
    last_checkpoint: Checkpoint | None = Field(None, description="The newest checkpoint.")
    attempts: int | None = Field(None, ge=0, description="Trainer pods started so far.")
    output_path: str | None = Field(
        None, max_length=1024, description="Where the adapter is, once Succeeded."
    )
    message: str | None = Field(None, max_length=4096, description="One line a person can act on.")


class QLoRAFinetune(ApiModel):
    """A QLoRA fine-tuning run: applied by a user, run as a Job by the operator."""

    api_version: Literal["qlora.io/v1alpha1"] = Field(API_VERSION, description="qlora.io/v1alpha1")
    kind: Literal["QLoRAFinetune"] = Field(KIND, description="QLoRAFinetune")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: QLoRAFinetuneSpec = Field(description="The run's settings; fixed once created but for suspend and two runtime fields.")
    status: QLoRAFinetuneStatus | None = Field(None, description="What the operator observed.")
