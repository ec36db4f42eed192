"""The pydantic models of the QLoRAFinetune API: defaults, bounds, reuse of the trainer's config, examples."""

from __future__ import annotations

import copy
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from qlora_operator import api
from qlora_trainer import config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

MINIMAL = {
    "dataset": {"configMap": {"name": "support-qa", "key": "data.jsonl"}},
    "output": {"pvc": {"claimName": "adapters", "path": "support-bot"}},
}


class Replace(dict):
    """A section that replaces the minimal spec's instead of being merged into it."""


def spec_with(**sections) -> dict:
    spec = copy.deepcopy(MINIMAL)
    for name, value in sections.items():
        if isinstance(value, dict) and not isinstance(value, Replace) and isinstance(spec.get(name), dict):
            spec[name] = {**spec[name], **value}
        else:
            spec[name] = dict(value) if isinstance(value, Replace) else value
    return spec


def test_minimal_spec_gets_the_recipe_of_api_md():
    spec = api.QLoRAFinetuneSpec.model_validate(MINIMAL)
    assert spec.model.name is None  # the operator's default, not the schema's
    assert spec.model.revision == "main" and spec.model.trust_remote_code is False
    assert (spec.quantization.bits, spec.quantization.quant_type, spec.quantization.double_quant) == (4, "nf4", True)
    assert spec.quantization.compute_dtype == "bfloat16"
    lora = spec.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.use_rslora, lora.init, lora.bias) == (
        16, 32, 0.1, True, "gaussian", "none"
    )
    assert lora.target_modules is None
    t = spec.training
    assert (t.epochs, t.max_steps, t.batch_size, t.gradient_accumulation_steps) == (3, None, 2, 8)
    assert (t.learning_rate, t.scheduler, t.optimizer) == (5e-5, "cosine", "paged_adamw_8bit")
    assert (t.max_grad_norm, t.weight_decay, t.max_length) == (0.3, 0.01, 1024)
    assert t.gradient_checkpointing and t.packing and t.seed == 42
    assert spec.dataset.format == "auto" and spec.dataset.eval_fraction == 0.05
    r = spec.resources
    assert (r.gpus, r.nodes, r.gpu_resource_name) == (1, 1, "nvidia.com/gpu")
    assert spec.runtime.image is None and spec.runtime.backoff_limit == 3
    assert spec.output.merge_adapter is False and spec.suspend is False


def test_trainer_sections_are_the_trainers_models():
    fields = api.QLoRAFinetuneSpec.model_fields
    assert fields["quantization"].annotation is config.QuantizationConfig
    assert fields["lora"].annotation is config.LoraConfig
    assert fields["training"].annotation is config.TrainingConfig
    assert issubclass(api.ModelSpec, config.ModelSource)
    assert issubclass(api.DatasetSpec, config.DatasetOptions)
    assert issubclass(api.QLoRAFinetuneSpec, config.ApiModel)


def test_wire_form_is_camel_case_and_round_trips():
    spec = api.QLoRAFinetuneSpec.model_validate(spec_with(model={"tokenSecretRef": {"name": "hf"}}))
    wire = spec.to_wire()
    assert wire["dataset"]["configMap"] == {"name": "support-qa", "key": "data.jsonl"}
    assert wire["model"]["tokenSecretRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert wire["training"]["gradientAccumulationSteps"] == 8
    assert "name" not in wire["model"]  # unset stays unset on the wire
    assert api.QLoRAFinetuneSpec.model_validate(wire) == spec


@pytest.mark.parametrize(
    "sections, where",
    [
        ({"dataset": Replace(format="qa")}, "dataset"),  # no source
        ({"dataset": {"hf": {"name": "org/data"}}}, "dataset"),  # two sources
        ({"dataset": {"inline": [{"question": "q", "answer": "a"}] * 501}}, "inline"),
        ({"dataset": {"evalFraction": 0.9}}, "evalFraction"),
        ({"lora": {"r": 0}}, "r"),
        ({"lora": {"r": 1025}}, "r"),
        ({"lora": {"dropout": 1.0}}, "dropout"),
        ({"lora": {"alpha": 0}}, "alpha"),
        ({"lora": {"targetModules": "q_proj"}}, "targetModules"),
        ({"quantization": {"bits": 3}}, "bits"),
        ({"quantization": {"bits": 8, "type": "nf4"}}, "quantization"),
        ({"training": {"learningRate": -1e-4}}, "learningRate"),
        ({"training": {"batchSize": 0}}, "training"),
        ({"training": {"batchSize": "big"}}, "batchSize"),
        ({"training": {"maxLength": 8}}, "maxLength"),
        ({"training": {"scheduler": "cyclic"}}, "scheduler"),
        ({"resources": {"gpus": -1}}, "gpus"),
        ({"resources": {"nodes": 0}}, "nodes"),
        ({"resources": {"memory": "lots"}}, "memory"),
        ({"output": {"pvc": {"claimName": "adapters", "path": "/abs"}}}, "path"),
        ({"output": {"pvc": {"claimName": "adapters", "path": "a/../../b"}}}, "path"),
        ({"output": Replace()}, "pvc"),
        ({"runtime": {"backoffLimit": -1}}, "backoffLimit"),
        ({"runtime": {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}}, "env"),
        ({"runtime": {"env": [{"name": "QLORA_CONFIG", "value": "{}"}]}}, "env"),
        ({"model": {"tokenSecretRef": {"name": "Bad_Name"}}}, "name"),
        ({"lora": {"rank": 8}}, "rank"),  # unknown field
    ],
)
def test_invalid_specs_are_refused_naming_the_field(sections, where):
    with pytest.raises(ValidationError) as caught:
        api.QLoRAFinetuneSpec.model_validate(spec_with(**sections))
    locations = [".".join(str(p) for p in e["loc"]) for e in caught.value.errors()]
    assert any(where in loc for loc in locations), locations


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                                  "hugging_face_hub_token", "GITHUB_APIKEY"])
def test_credentials_need_a_secret_reference(name):
    with pytest.raises(ValidationError, match="secretKeyRef"):
        api.EnvVar.model_validate({"name": name, "value": "x"})
    api.EnvVar.model_validate({"name": name, "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}})


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "MAX_TOKENS", "WANDB_PROJECT", "HF_HUB_OFFLINE"])
def test_ordinary_variables_take_literal_values(name):
    assert api.EnvVar.model_validate({"name": name, "value": "1"}).value == "1"
    assert not re.search(api.SECRET_ENV_NAME, name)


def test_target_modules_takes_a_list_or_all_linear():
    assert api.QLoRAFinetuneSpec.model_validate(spec_with(lora={"targetModules": "all-linear"})).lora.target_modules == "all-linear"
    assert api.QLoRAFinetuneSpec.model_validate(spec_with(lora={"targetModules": ["q_proj"]})).lora.target_modules == ["q_proj"]


def test_batch_size_takes_auto():
    assert api.QLoRAFinetuneSpec.model_validate(spec_with(training={"batchSize": "auto"})).training.batch_size == "auto"


def test_mutable_fields_exist():
    spec_fields = {f.alias for f in api.QLoRAFinetuneSpec.model_fields.values()}
    runtime_fields = {f.alias for f in api.RuntimeSpec.model_fields.values()}
    for path in api.MUTABLE_AFTER_CREATE:
        head, _, child = path.partition(".")
        assert head in spec_fields
        assert not child or child in runtime_fields


def test_status_parses_what_the_operator_writes():
    status = api.QLoRAFinetuneStatus.model_validate(
        {
            "phase": "Running",
            "conditions": [
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "TrainerStarted",
                    "message": "step 12 of 300",
                    "lastTransitionTime": "2026-11-27T22:00:00Z",
                    "observedGeneration": 1,
                }
            ],
            "observedGeneration": 1,
            "jobName": "support-bot-abc12",
            "model": {"name": "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", "revision": "main"},
            "progress": "4%",
            "step": 12,
            "totalSteps": 300,
            "epoch": 0.12,
            "loss": 1.84,
            "gpuMemoryPeakBytes": 6_335_000_000,
            "eta": "41m10s",
            "lastCheckpoint": {"step": 10, "path": "checkpoints/checkpoint-10"},
            "attempts": 1,
        }
    )
    assert status.conditions[0].last_transition_time == datetime(2026, 11, 27, 22, tzinfo=timezone.utc)
    wire = status.to_wire()
    assert wire["conditions"][0]["lastTransitionTime"] == "2026-11-27T22:00:00Z"
    assert wire["lastCheckpoint"] == {"step": 10, "path": "checkpoints/checkpoint-10"}


@pytest.mark.parametrize("reason", ["not camel", "Bad-Reason", ""])
def test_condition_reason_is_one_camel_case_word(reason):
    with pytest.raises(ValidationError):
        api.Condition.model_validate(
            {"type": "Succeeded", "status": "False", "reason": reason, "lastTransitionTime": "2026-11-27T22:00:00Z"}
        )


def test_failure_reasons_of_api_md():
    assert {r.value for r in api.Reason} == {
        "InvalidSpec", "SecretNotFound", "Unschedulable", "ImagePullError", "CUDAOutOfMemory", "OOMKilled",
        "DatasetInvalid", "ModelLoadFailed", "BackoffLimitExceeded", "DeadlineExceeded",
    }
    assert {c.value for c in api.ConditionType} == {"SpecValid", "JobCreated", "Running", "Succeeded", "Suspended"}


def test_names_of_the_resource():
    assert (api.GROUP, api.VERSION, api.KIND, api.PLURAL, api.SINGULAR) == (
        "qlora.io", "v1alpha1", "QLoRAFinetune", "qlorafinetunes", "qlorafinetune"
    )
    assert api.SHORT_NAMES == ("qft", "qlora") and api.CATEGORIES == ("all", "ml")
    assert [c["name"] for c in api.PRINTER_COLUMNS] == ["Phase", "Progress", "Loss", "Epoch", "ETA", "Model", "Age"]
    assert [c.get("priority", 0) for c in api.PRINTER_COLUMNS] == [0, 0, 0, 0, 0, 1, 0]


def test_optimizers_are_the_transformers_trainers():
    training_args = pytest.importorskip("transformers.training_args")
    assert set(api.TRAINER_OPTIMIZERS) == {o.value for o in training_args.OptimizerNames}


def test_every_example_is_one_resource_the_models_accept():
    assert {p.name for p in EXAMPLES} >= {
        "minimal.yaml", "full.yaml", "persona-ko.yaml", "hf-dataset.yaml", "suspended-queue.yaml"
    }
    for path in EXAMPLES:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        finetunes = [d for d in documents if d["kind"] == api.KIND]
        assert len(finetunes) == 1, path.name
        resource = api.QLoRAFinetune.model_validate(finetunes[0])
        assert resource.api_version == api.API_VERSION


def test_persona_example_carries_its_data_and_persona():
    documents = list(yaml.safe_load_all((REPO / "examples" / "persona-ko.yaml").read_text(encoding="utf-8")))
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    finetune = api.QLoRAFinetune.model_validate(next(d for d in documents if d["kind"] == api.KIND))
    source = finetune.spec.dataset.config_map
    assert source.name == config_map["metadata"]["name"]
    records = [yaml.safe_load(line) for line in config_map["data"][source.key].splitlines() if line.strip()]
    assert len(records) >= 5 and all(set(r) == {"question", "answer"} for r in records)
    assert re.search("[가-힣]", finetune.spec.dataset.system_prompt)


def test_full_example_sets_every_field():
    document = yaml.safe_load((REPO / "examples" / "full.yaml").read_text(encoding="utf-8"))
    missing = []

    def walk(model: type, value: dict, path: str) -> None:
        for name, field in model.model_fields.items():
            key = field.alias or name
            if key in ("pvc", "hf", "inline") and model is api.DatasetSpec:
                continue  # one source at a time; the others are shown in comments
            if key == "pvc" and model is api.ModelSpec:
                continue  # the hub and a volume exclude each other; shown in a comment
            if key not in value:
                missing.append(f"{path}.{key}")
                continue
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, config.ApiModel) and isinstance(value[key], dict):
                walk(sub, value[key], f"{path}.{key}")

    walk(api.QLoRAFinetuneSpec, document["spec"], "spec")
    assert missing == []
