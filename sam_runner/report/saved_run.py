"""A finished (or interrupted) run rebuilt from its directory: config from run.json, data, model with its weights.

`sam-measure` and `sam-landscape` read runs this way, so both see exactly the data and network the run trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from sam_runner.errors import CheckpointError
from sam_runner.run import checkpoint, rundir
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
    try:
        cfg = OmegaConf.create(rundir.run_config(run_dir))
    except rundir.UnreadableRecord as error:
        raise CheckpointError(f"{error}: pass a run directory written by sam-run") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            OmegaConf.update(cfg, key, value)
    spec = make_spec(cfg)
    state = checkpoint.load(checkpoint_path or run_dir / rundir.CHECKPOINT, map_location=spec.device)
    seed_everything(spec.settings.seed)
    data = build_data(spec, spec.device)
    model = build_model(spec.model, data.num_classes, data.input_shape).to(spec.device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint does not match the run's model ({str(error).splitlines()[0]})") from None
    return SavedRun(run_dir, spec, data, model, state)
