"""A finished (or interrupted) run rebuilt from its directory: config from run.json, data, model with its weights.

`sam-measure` and `sam-landscape` read runs this way, so both see exactly the data and network the run trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from sam_runner.errors import CheckpointError
from sam_runner.run import checkpoint
from sam_runner.run.build import Data, build_data, build_model, seed_everything
from sam_runner.run.spec import RunSpec, Settings, make_spec


@dataclass
class SavedRun:
    """One run directory, loaded: its spec, data streams and model at the checkpoint."""

    run_dir: Path
    spec: RunSpec
    data: Data
    model: nn.Module
    state: dict[str, Any]  # the checkpoint dict (epoch, step, optimizer, ...)

    @property
    def settings(self) -> Settings:
        return self.spec.settings


def load(run_dir: Path, *, checkpoint_path: Path | None = None, overrides: dict[str, Any] | None = None
         ) -> SavedRun:
    """Rebuild `run_dir`'s run; `overrides` (dotted key -> value, None = keep) change its config first."""
    info_path = run_dir / "run.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{info_path} is missing or unreadable ({error}): pass a run directory written by "
                              f"sam-run") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise CheckpointError(f"{info_path} holds no run config: pass a run directory written by sam-run")
    cfg = OmegaConf.create(info["config"])
    for key, value in (overrides or {}).items():
        if value is not None:
            OmegaConf.update(cfg, key, value)
    spec = make_spec(cfg)
    state = checkpoint.load(checkpoint_path or run_dir / "checkpoints" / "last.pt", map_location=spec.device)
    seed_everything(spec.settings.seed)
    data = build_data(spec, spec.device)
    model = build_model(spec.model, data.num_classes, data.input_shape).to(spec.device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint does not match the run's model ({str(error).splitlines()[0]})") from None
    return SavedRun(run_dir, spec, data, model, state)
