"""Operator-side checks of a spec: what the CRD schema cannot say, reported as InvalidSpec naming the field."""

from __future__ import annotations

import copy

import pytest

from qlora_operator import validation
from qlora_operator.validation import INVALID_SPEC, validate_spec

MINIMAL = {
    "dataset": {"configMap": {"name": "support-qa", "key": "data.jsonl"}},
    "output": {"pvc": {"claimName": "adapters", "path": "support-bot"}},
}


def spec_with(**sections) -> dict:
    spec = copy.deepcopy(MINIMAL)
    spec.update(sections)
    return spec


def test_a_valid_spec_passes_every_check():
    assert validate_spec(MINIMAL) is None
    for check in validation.CHECKS:
        assert check(MINIMAL) is None, check.__name__


@pytest.mark.parametrize("value", [None, "all-linear", ["q_proj", "v_proj"], []])
def test_target_modules_of_the_right_shape_pass(value):
    lora = {} if value is None else {"targetModules": value}
    assert validation.check_target_modules(spec_with(lora=lora)) is None
    assert validate_spec(spec_with(lora=lora)) is None


@pytest.mark.parametrize(
    "value, field, hint",
    [
        ("q_proj", "spec.lora.targetModules", "[q_proj, v_proj]"),
        (16, "spec.lora.targetModules", "got a number"),
        ({"q": 1}, "spec.lora.targetModules", "got an object"),
        (True, "spec.lora.targetModules", "got a boolean"),
        (["q_proj", 3], "spec.lora.targetModules[1]", "module name"),
        (["q_proj", ""], "spec.lora.targetModules[1]", "empty string"),
    ],
)
def test_target_modules_of_another_shape_are_invalid(value, field, hint):
    reason, message = validate_spec(spec_with(lora={"targetModules": value}))
    assert reason == INVALID_SPEC == "InvalidSpec"
    assert message.startswith(field + ":") and hint in message
    if field.endswith("targetModules"):  # the shape is wrong: say both shapes that are right
        assert "all-linear" in message and "list" in message


def test_inline_records_must_fit_a_config_map():
    small = [{"question": "q", "answer": "a"}] * 500
    assert validation.check_inline_size(spec_with(dataset={"inline": small})) is None
    big = [{"question": "질문 " * 200, "answer": "답변 " * 400}] * 500
    reason, message = validate_spec(spec_with(dataset={"inline": big}))
    assert reason == INVALID_SPEC
    assert message.startswith("spec.dataset.inline:") and "dataset.configMap" in message


@pytest.mark.parametrize(
    "model_path, output_path, overlaps",
    [
        ("models/exaone", "models/exaone", True),
        ("models/exaone", "models/exaone/adapter", True),  # inside the model folder
        ("models", "models/exaone-adapter", True),
        (None, "adapters/run-1", True),  # the model is the whole volume
        ("models/exaone", "adapters/run-1", False),
        ("models/exaone", "models/exaone-adapter", False),  # a sibling, not a child
    ],
)
def test_output_must_not_overlap_the_model_folder(model_path, output_path, overlaps):
    model_pvc = {"claimName": "shared"} | ({"path": model_path} if model_path else {})
    spec = spec_with(model={"pvc": model_pvc}, output={"pvc": {"claimName": "shared", "path": output_path}})
    problem = validation.check_output_apart_from_model(spec)
    assert (problem is not None) == overlaps
    if overlaps:
        assert problem[0] == INVALID_SPEC and problem[1].startswith("spec.output.pvc:")
    other_claim = spec_with(model={"pvc": model_pvc}, output={"pvc": {"claimName": "other", "path": output_path}})
    assert validation.check_output_apart_from_model(other_claim) is None


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"lora": {"r": 0}}, "spec.lora.r:"),
        ({"training": {"learningRate": -0.1}}, "spec.training.learningRate:"),
        ({"quantization": {"bits": 3}}, "spec.quantization.bits:"),
        ({"dataset": {"format": "qa"}}, "spec.dataset:"),
        ({"resources": {"cpu": "two"}}, "spec.resources.cpu:"),
        ({"runtime": {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}}, "spec.runtime.env[0]:"),
        ({"training": {"batchSize": "big"}}, "spec.training.batchSize:"),
        ({"lora": {"rank": 4}}, "spec.lora.rank:"),
    ],
)
def test_the_models_back_the_schema_up(sections, field):
    reason, message = validate_spec(spec_with(**sections))
    assert reason == INVALID_SPEC and message.startswith(field), message


def test_the_first_problem_is_reported():
    spec = spec_with(lora={"targetModules": 5, "r": 0})
    assert validate_spec(spec)[1].startswith("spec.lora.targetModules:")


def test_checks_do_not_change_the_spec():
    spec = spec_with(lora={"targetModules": ["q_proj"]}, dataset={"inline": [{"text": "x"}]})
    before = copy.deepcopy(spec)
    validate_spec(spec)
    assert spec == before
