"""What the trainer promises the operator: metric names, phases, exit codes and failure reasons.

One place for each, torch-free, so the trainer that exports them and the operator that reads them import
the same names (shared/API.md, "The trainer's metrics").
"""

from __future__ import annotations

import enum

METRIC_PREFIX = "qlora_trainer_"
METRICS_PORT = 9090
METRICS_PATH = "/metrics"


class Metric(str, enum.Enum):
    """Series the trainer serves, without the prefix; `full` gives the exported name."""

    STEP = "step"
    TOTAL_STEPS = "total_steps"
    EPOCH = "epoch"
    LOSS = "loss"
    EVAL_LOSS = "eval_loss"
    LEARNING_RATE = "learning_rate"
    GRAD_NORM = "grad_norm"
    TOKENS_PER_SECOND = "tokens_per_second"
    TOKENS_TOTAL = "tokens_total"  # a counter: exported as qlora_trainer_tokens_total
    GPU_MEMORY_PEAK_BYTES = "gpu_memory_peak_bytes"
    ETA_SECONDS = "eta_seconds"
    LAST_CHECKPOINT_STEP = "last_checkpoint_step"
    START_TIME_SECONDS = "start_time_seconds"
    PHASE = "phase"  # a state set: one sample per phase, 1 for the current one

    @property
    def full(self) -> str:
        return METRIC_PREFIX + self.value


class Phase(str, enum.Enum):
    """The trainer's own phase, exported as the `phase` state set."""

    LOADING = "loading"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"
    DONE = "done"
    FAILED = "failed"


class FailureReason(str, enum.Enum):
    """Why a trainer run failed; the value is the reason a user sees in the resource's conditions."""

    INVALID_CONFIG = "InvalidSpec"
    DATASET_INVALID = "DatasetInvalid"
    MODEL_LOAD_FAILED = "ModelLoadFailed"
    CUDA_OUT_OF_MEMORY = "CUDAOutOfMemory"
    TRAINING_FAILED = "TrainingFailed"
    RENDEZVOUS_TIMEOUT = "RendezvousTimeout"  # the pods of a multi-node run did not all start in time

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self]

    @property
    def retryable(self) -> bool:
        """Whether another attempt of the same pod could succeed (the Job's podFailurePolicy reads this)."""
        return self in (FailureReason.CUDA_OUT_OF_MEMORY, FailureReason.TRAINING_FAILED,
                        FailureReason.RENDEZVOUS_TIMEOUT)


# Exit codes are part of the contract: the operator's podFailurePolicy fails the Job at once on the
# non-retryable ones. Kept clear of 1 (any uncaught error), 2 (usage), 126-128 and signals (128+n).
EXIT_CODES: dict[FailureReason, int] = {
    FailureReason.INVALID_CONFIG: 64,
    FailureReason.DATASET_INVALID: 65,
    FailureReason.MODEL_LOAD_FAILED: 66,
    FailureReason.CUDA_OUT_OF_MEMORY: 67,
    FailureReason.TRAINING_FAILED: 70,
    FailureReason.RENDEZVOUS_TIMEOUT: 71,
}
EXIT_SUCCESS = 0
# Exit code after a SIGTERM that saved a checkpoint: the pod was asked to stop, nothing failed.
EXIT_TERMINATED = 143


def reason_for_exit_code(code: int) -> FailureReason | None:
    """The failure class an exit code stands for, or None when it is not one of the trainer's."""
    for reason, known in EXIT_CODES.items():
        if known == code:
            return reason
    return None


# The JSON summary the trainer writes to the termination-message path (at most this many bytes).
TERMINATION_MESSAGE_LIMIT = 4096
