"""`python -m qlora_trainer --config FILE` (or the document in $QLORA_CONFIG): run one fine-tune, serve its
metrics, and exit with the contract's code and a termination summary of at most 4 KiB."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

import yaml

from .config import TrainerConfig, load_config
from .contract import EXIT_SUCCESS, EXIT_TERMINATED, FailureReason, Phase

log = logging.getLogger("qlora_trainer")


def _termination_path(config_file: str | None) -> str:
    """The configured termination-message path, read leniently, for when the config itself is invalid."""
    default = TrainerConfig.model_fields["termination_message_path"].default
    try:
        text = open(config_file, encoding="utf-8").read() if config_file else os.environ.get("QLORA_CONFIG", "")
        document = yaml.safe_load(text)
        return str(document.get("terminationMessagePath") or document.get("termination_message_path") or default)
    except Exception:  # an unreadable config is reported as InvalidSpec elsewhere
        return default


def _is_cuda_oom(err: BaseException) -> bool:
    return type(err).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(err)


def _config_error(err: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors(include_url=False)
        ]
        return "invalid config: " + "; ".join(problems)
    return f"invalid config: {err}"


def main(argv: list[str] | None = None) -> int:
    from .speed import allocator_env

    allocator_env()  # before anything starts CUDA
    parser = argparse.ArgumentParser(prog="python -m qlora_trainer", description=__doc__)
    parser.add_argument("--config", help="JSON or YAML config file (default: the QLORA_CONFIG variable)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    # Imported here so that `--help` and an invalid config answer without loading torch.
    from .output import failure_summary, write_termination_message

    termination_path = _termination_path(args.config)
    try:
        cfg = load_config(args.config)
    except Exception as err:  # file, YAML, JSON and validation errors all mean the same to a user
        message = _config_error(err)
        log.error("%s", message)
        reason = FailureReason.INVALID_CONFIG
        write_termination_message(termination_path, failure_summary("Failed", reason.exit_code, message, reason.value, None))
        return reason.exit_code

    from .launch import is_main_process, launch, needs_launcher

    if needs_launcher(cfg):
        return launch(cfg, sys.argv[1:] if argv is None else argv)
    main_process = is_main_process()
    if not main_process:  # one copy of the progress lines is enough
        logging.getLogger().setLevel(logging.WARNING)

    from .errors import CUDAOutOfMemory, TrainerError, oom_message
    from .metrics import TrainerMetrics
    from .training import StopOnSignal, Terminated, train

    if not sys.stderr.isatty():  # progress bars only on a terminal; a pod's log gets the progress lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    metrics = TrainerMetrics()
    stop = StopOnSignal()
    stop.install()
    try:
        if main_process:
            metrics.serve(cfg.metrics.port, cfg.metrics.host)
        summary = train(cfg, metrics, stop)
        code = EXIT_SUCCESS
        log.info("done: step %s, loss %s, eval loss %s; adapter in %s",
                 summary["step"], summary["loss"], summary["evalLoss"], summary["outputPath"])
    except Terminated as err:
        code = EXIT_TERMINATED
        log.warning("%s", err)
        summary = failure_summary("Terminated", code, str(err), None, metrics)
        metrics.set_phase(Phase.DONE)
    except BaseException as err:  # every failure ends in a summary the operator can read
        if isinstance(err, TrainerError):
            failure = err
        elif _is_cuda_oom(err):
            failure = CUDAOutOfMemory(oom_message(
                cfg.training.batch_size, cfg.training.max_length, cfg.training.packing, str(err).splitlines()[0]
            ))
        elif isinstance(err, KeyboardInterrupt):
            raise
        else:
            log.error("%s", "".join(traceback.format_exception(err)).rstrip())
            failure = TrainerError(f"training failed: {type(err).__name__}: {err}")
        code = failure.exit_code
        log.error("%s: %s", failure.reason.value, failure)
        summary = failure_summary("Failed", code, str(failure), failure.reason.value, metrics)
        metrics.set_phase(Phase.FAILED)
    if main_process:
        write_termination_message(cfg.termination_message_path, summary)
    metrics.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
