"""Checkpoints and outputs that are whole or absent.

The Trainer writes a checkpoint's files one after another into `checkpoint-N`. A kill in between, or a node that
crashes before the page cache reached the disk, leaves a folder that looks like a checkpoint (its
`trainer_state.json` intact, its `optimizer.pt` cut short) and fails every restart from it. So a checkpoint is
written under `checkpoints/.partial/`, its files flushed to the disk and their sizes listed in a manifest, and
only then renamed into place: one atomic step on one filesystem. A restart takes the newest checkpoint whose
files match its manifest, and skips the others, saying why.

The final outputs go the same way: staged in `output.dir/.partial-outputs/`, flushed, then moved into `output.dir`
one file at a time, `summary.json` last, so that a `summary.json` there means the outputs are whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
STAGING = ".partial"  # under the checkpoints folder: checkpoints being written
OUTPUTS_STAGING = ".partial-outputs"  # under output.dir: the final outputs being written
MANIFEST = "qlora-checkpoint.json"
# Left by transformers' own interrupted saves (its just-in-time checkpointing).
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint folder's name, or -1 for another name."""
    prefix, _, step = path.name.rpartition("-")
    return int(step) if prefix == PREFIX and step.isdigit() else -1


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush(folder: Path) -> None:
    """Every file and folder under `folder`, and `folder` itself, on the disk (not only in the page cache)."""
    for path in _files(folder):
        _fsync(path)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync(path)
    _fsync(folder)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a checkpoint written in `staged` to `final`, whole: its files flushed, a manifest of their sizes
    written, then one rename. A folder already at `final` is what an attempt before left of the same step, never
    a checkpoint this run resumed from (that one was older): it goes."""
    manifest = {"files": {str(p.relative_to(staged)): p.stat().st_size for p in _files(staged)}}
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    flush(staged)
    if final.exists():
        shutil.rmtree(final)
    os.rename(staged, final)
    _fsync(final.parent)
    with contextlib.suppress(OSError):  # the staging folder, once empty, goes too
        staged.parent.rmdir()


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is whole."""
    if (path / INCOMPLETE_MARKER).exists():
        return "its save did not finish"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json unreadable ({type(err).__name__})"
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "model.safetensors")):
        return "no adapter weights"
    try:
        listed: dict[str, Any] = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return None  # written before checkpoints had manifests: the checks above are all there is
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} unreadable ({type(err).__name__})"
    for name, size in sorted(listed.items()):
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes of {size}"
    return None


def is_valid_checkpoint(path: Path) -> bool:
    return checkpoint_problem(path) is None


def last_valid_checkpoint(folder: str | Path) -> Path | None:
    """The newest whole checkpoint under `folder`, skipping (and naming) any that a kill or crash left broken."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) >= 0),
                        key=checkpoint_step, reverse=True)
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def publish_outputs(staged: Path, out: Path, last: str) -> None:
    """Move the outputs written in `staged` into `out`, flushed first; `last` (summary.json) goes last."""
    flush(staged)
    entries = sorted(staged.iterdir(), key=lambda p: p.name == last)
    for entry in entries:
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a folder (the merged model) of an attempt before
        os.replace(entry, target)
    _fsync(out)
    staged.rmdir()
