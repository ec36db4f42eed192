"""Behaves like the trainer at its edges: reads the config the operator wrote (validated with the real
TrainerConfig), stays up for a while, writes the termination summary and exits with the trainer's exit code.

Driven by the pod's environment (the resource's `runtime.env`):
  STANDIN_SLEEP    seconds to run before exiting (default 0); SIGTERM ends it early with exit code 143
  STANDIN_EXIT     exit code (default 0); a code of the contract (64..70) gives its failure reason
  STANDIN_MESSAGE  the summary's message on failure
  STANDIN_SUMMARY  "0" to write no summary (the termination message then falls back to the log)
"""

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

OWN_FOLDER = Path(__file__).resolve().parents[1]  # the folder that holds this stand-in package


def _real(module: str):
    """A module of the real trainer, by its file: the package name is this stand-in's own on the path."""
    for entry in sys.path:
        path = Path(entry or ".").resolve() / "qlora_trainer" / f"{module}.py"
        if path.parents[1] != OWN_FOLDER and path.exists():
            spec = importlib.util.spec_from_file_location(f"real_{module}", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            return mod
    raise SystemExit(f"stand-in: the real qlora_trainer/{module}.py is on no entry of sys.path")


def main() -> int:
    config_path = sys.argv[sys.argv.index("--config") + 1]
    config = _real("config").TrainerConfig.model_validate(json.loads(Path(config_path).read_text()))
    contract = _real("contract")
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    print(f"stand-in trainer: model {config.model.name}, output {config.output.dir}", flush=True)
    deadline = time.monotonic() + float(os.environ.get("STANDIN_SLEEP", "0"))
    while time.monotonic() < deadline and not stopped:
        time.sleep(0.1)
    code = 143 if stopped else int(os.environ.get("STANDIN_EXIT", "0"))
    reason = contract.reason_for_exit_code(code)
    summary = {"step": 3, "loss": 1.25, "evalLoss": 1.5, "outputDir": config.output.dir}
    if code == 0:
        Path(config.output.dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output.dir) / "summary.json").write_text(json.dumps(summary))
    elif reason is not None:
        summary |= {"reason": reason.value, "message": os.environ.get("STANDIN_MESSAGE", f"stand-in failed ({reason.value})")}
    print(os.environ.get("STANDIN_MESSAGE", f"stand-in exiting with {code}"), flush=True)
    if os.environ.get("STANDIN_SUMMARY", "1") != "0":
        Path(config.termination_message_path).write_text(json.dumps(summary))
    return code


if __name__ == "__main__":
    sys.exit(main())
