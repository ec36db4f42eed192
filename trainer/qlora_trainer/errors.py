"""Failure classes of a trainer run: each carries the contract's reason (and so its exit code) and a message
that names the cause, so the operator can show it to a person as it is."""

from __future__ import annotations

from .contract import FailureReason


class TrainerError(Exception):
    """A failure the trainer understands: `reason` picks the exit code, `str(err)` is the message."""

    reason: FailureReason = FailureReason.TRAINING_FAILED

    @property
    def exit_code(self) -> int:
        return self.reason.exit_code


class InvalidConfig(TrainerError):
    """The config asks for something impossible (an unknown optimizer, a LoRA target that matches nothing)."""

    reason = FailureReason.INVALID_CONFIG


class DatasetInvalid(TrainerError):
    """The data cannot be read or a record has the wrong shape."""

    reason = FailureReason.DATASET_INVALID


class ModelLoadFailed(TrainerError):
    """The base model or its tokenizer cannot be loaded."""

    reason = FailureReason.MODEL_LOAD_FAILED


class CUDAOutOfMemory(TrainerError):
    """The GPU ran out of memory; the message says which knobs to turn."""

    reason = FailureReason.CUDA_OUT_OF_MEMORY


def oom_message(batch_size: int | str, max_length: int, packing: bool, detail: str = "") -> str:
    """What to change after a CUDA out-of-memory error."""
    hint = (
        f"CUDA out of memory with training.batchSize={batch_size} and training.maxLength={max_length}"
        f"{' (packing on)' if packing else ''}: lower training.batchSize (raise "
        "training.gradientAccumulationSteps to keep the optimizer batch) or training.maxLength, "
        "or keep training.gradientCheckpointing on"
    )
    return f"{hint}; {detail}" if detail else hint
