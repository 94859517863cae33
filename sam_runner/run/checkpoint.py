"""Checkpoints that survive a crash at any moment, and a load that says clearly when one is unusable.

A checkpoint is one plain dict (nanoGPT style). It is written to a temporary file in the same directory,
flushed to disk, then renamed over the old one: a kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from sam_runner.errors import CheckpointError
from sam_runner.run.rundir import CHECKPOINT

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "epoch")


def replace_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write through `write(file)` into a temporary sibling of `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; outputs are meant to be shared and read
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Save a checkpoint dict; the file at `path` is always either the old or the new checkpoint."""
    replace_atomically(path, lambda file: _save(state, _WriteErrors(file)))


class _WriteErrors:
    """A file that remembers why a write failed: torch.save turns the OSError of a full disk into an opaque
    RuntimeError ("enforce fail at inline_container.cc"), and the user must be told the disk is full."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _save(state: dict[str, Any], file: _WriteErrors) -> None:
    try:
        torch.save({"format_version": FORMAT_VERSION, **state}, file)
    except RuntimeError:
        if file.error is not None:
            raise file.error from None
        raise


def strict_json(data: Any, **dumps_options: Any) -> str:
    """JSON text that strict parsers (JavaScript, jq, dashboards) accept: NaN and ±infinity, which JSON has no
    words for, are written as null (a diverged run's losses, say); anything else unknown as its str()."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), allow_nan=False, default=str, **dumps_options)


def write_json_atomic(data: Any, path: Path) -> None:
    """JSON files (summary.json, run.json) are replaced atomically too, so readers never see half a file."""
    text = strict_json(data, indent=2) + "\n"
    replace_atomically(path, lambda file: file.write(text.encode()))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; any problem becomes a `CheckpointError` naming the file and the fix."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: check the path (runs write checkpoints/last.pt)")
    try:
        # weights_only: a checkpoint holds tensors and plain containers, never code to run.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a sam-runner checkpoint ({reason}): "
                              f"delete it or point to another one") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by sam-runner")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format_version']}, newer than this "
                              f"sam-runner reads ({FORMAT_VERSION}): upgrade sam-runner")
    return state


def initial_weights(source: Path, network: torch.nn.Module) -> dict[str, Any]:
    """Load another run's weights into `network` (`init_from`): from a run directory's checkpoints/last.pt or a
    checkpoint file; its optimizer, schedule and position stay behind (continuing a run is resume's). Returns what
    summary.json and the log say of the source. A model of another shape is refused in one line."""
    path = source / CHECKPOINT if source.is_dir() else source
    if not path.is_file():
        raise CheckpointError(f"init_from={source}: no checkpoint there (give a run directory written by sam-run, "
                              f"which holds {CHECKPOINT}, or a checkpoint file)")
    state = load(path)
    try:
        network.load_state_dict(state["model"])
    except RuntimeError as error:  # missing or unexpected keys, or a tensor of another shape
        lines = [line.strip().rstrip(".") for line in str(error).splitlines()]
        details = "; ".join(lines[1:3]) or lines[0]  # below torch's heading "Error(s) in loading state_dict for"
        raise CheckpointError(f"init_from={source}: its weights do not fit this model ({details}): give a run of "
                              f"the same model") from None
    return {"path": str(path.resolve()), "epoch": state["epoch"], "step": state.get("step")}
