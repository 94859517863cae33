"""Exact resume: what a checkpoint holds, how a run continues from it, and what re-running a command does with a
run directory that already holds a run (continue it, leave a finished one alone, or refuse a different config).

A checkpoint holds the model, optimizer, schedule, scaler, every random generator, the run's `Progress`
(epoch, batch within it, the epoch's statistics so far, how much of the records are written), its summary and
its clock. With the data order a function of (seed, epoch), a continued run is bitwise the run that was never
stopped (on the CPU; cuDNN's kernel choice can differ between processes on a GPU).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_runner.errors import CheckpointError, ConfigError
from sam_runner.run import checkpoint, rundir
from sam_runner.run.build import Training
from sam_runner.run.measurement import keep_remeasurements
from sam_runner.run.progress import Progress
from sam_runner.run.rundir import CHECKPOINT, read_summary, run_config
from sam_runner.run.status import ENDED
from sam_runner.scale.distributed import World

log = logging.getLogger("sam_runner")

# Keys that may differ between a run and its continuation: they change neither the numbers nor the run's meaning.
IGNORED_ON_RESUME = ("resume", "progress_every", "data_dir", "jobs_per_gpu")
SHOWN_DIFFERENCES = 6


@dataclass
class Prior:
    """What a run directory holds for this invocation: nothing to continue, a checkpoint, or a finished run."""

    checkpoint: dict[str, Any] | None = None  # continue from this state
    summary: dict[str, Any] | None = None  # the run has ended already: this is its summary

    @property
    def ended(self) -> bool:
        return self.summary is not None


def inspect(run_dir: Path, config: dict[str, Any], *, resume: bool) -> Prior:
    """Decide what to do with `run_dir`'s earlier records, before anything is written there.

    A directory whose files no sam-run wrote (no run.json) is refused either way. resume=false removes the earlier
    run's records (asked for, so said in the log). Otherwise the earlier run must have the same config (else a
    `ConfigError` names the differing keys); an ended run is left alone, a checkpoint is continued from, and
    records without a checkpoint (a run killed before its first one) are started over.
    The checkpoint is read onto the CPU (the random generators' states must be there; the rest moves to the
    device as it is loaded), which also lets rank 0 hand it to the other processes of a DDP run.
    """
    if not rundir.has_records(run_dir):
        return Prior()
    rundir.refuse_foreign(run_dir)
    if not resume:
        _start_over(run_dir, "resume=false")
        return Prior()
    refuse_another_config(run_dir, config)
    summary = read_summary(run_dir) or {}
    if summary.get("status") in ENDED:
        return Prior(summary=summary)
    if not (run_dir / CHECKPOINT).is_file():
        if summary.get("epochs_completed") or summary.get("steps_completed"):  # it checkpointed: the file is gone
            raise CheckpointError(f"{run_dir} holds a run that trained {summary.get('steps_completed', 0)} steps but "
                                  f"no {CHECKPOINT} to continue from: put it back, or add resume=false to start over")
        _start_over(run_dir, "no checkpoint to continue from (the earlier run stopped before its first)")
        return Prior()
    state = checkpoint.load(run_dir / CHECKPOINT)  # on the CPU: RNG states must stay there; restore moves the rest
    if "progress" not in state:
        raise CheckpointError(f"{run_dir / CHECKPOINT} was written by an older sam-runner and cannot be continued "
                              f"exactly: add resume=false to start over")
    differences = config_differences(state.get("config", config), config)  # older checkpoints name no config
    if differences:
        shown = "; ".join(differences[:SHOWN_DIFFERENCES])
        raise CheckpointError(f"{run_dir / CHECKPOINT} belongs to another run ({shown}): put this run's checkpoint "
                              f"back, or add resume=false to start over")
    keep_remeasurements(state["summary"], summary)
    return Prior(checkpoint=state)


def _start_over(run_dir: Path, reason: str) -> None:
    removed = rundir.start_over(run_dir)
    log.warning("%s: removed the earlier run's %s from %s, starting over", reason, ", ".join(removed) or "records",
                run_dir)


def check_before_launch(run_dir: Path, config: dict[str, Any], *, resume: bool) -> None:
    """What `inspect` refuses, checked before Hydra writes its .hydra/ files into the directory of a single run:
    a directory another run holds, files no sam-run wrote, or a run with another config."""
    if not rundir.has_records(run_dir):
        return
    rundir.refuse_if_held(run_dir)
    rundir.refuse_foreign(run_dir)
    if resume:
        refuse_another_config(run_dir, config)


def refuse_another_config(run_dir: Path, config: dict[str, Any]) -> None:
    """A directory whose run.json is a sam-run's (rundir.refuse_foreign first) holding a run of another config."""
    differences = config_differences(run_config(run_dir), config)
    if differences:
        shown = "; ".join(differences[:SHOWN_DIFFERENCES])
        more = f" and {len(differences) - SHOWN_DIFFERENCES} more" if len(differences) > SHOWN_DIFFERENCES else ""
        raise ConfigError(f"{run_dir} holds a run with another config ({shown}{more}): choose another "
                          f"hydra.run.dir, or add resume=false to start over there")


def config_differences(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: earlier -> now` for every dotted key whose value differs, apart from IGNORED_ON_RESUME, values that
    differ only by the data_dir they were derived from (`cache_dir: ${data_dir}`: data_dir may change), and keys
    added to sam-runner since the earlier run that are off (`init_from: null`, a new feature's default): that run
    ran without them."""
    flat_earlier, flat_now = _flatten(earlier), _flatten(now)
    keys = sorted(set(flat_earlier) | set(flat_now))
    dirs = flat_earlier.get("data_dir"), flat_now.get("data_dir")
    return [f"{key}: {flat_earlier.get(key, '(absent)')} -> {flat_now.get(key, '(absent)')}" for key in keys
            if key not in IGNORED_ON_RESUME and not _added_and_off(key, flat_earlier, flat_now)
            and _differs(flat_earlier.get(key, _ABSENT), flat_now.get(key, _ABSENT), *dirs)]


_ABSENT = object()
OFF_VALUES = (None, False)  # what a key added later is set to when its feature is off
# keys added later whose off value is another value (compared by value: 0 and 0.0 alike): the earlier run ran so
OFF_SETTINGS = {"sam_start": 0.0, "accumulate": 1, "optimizer.sam.variant": "sam",
                "optimizer.sam.rho_schedule": "constant"}


def _added_and_off(key: str, earlier: dict[str, Any], now: dict[str, Any]) -> bool:
    if key in earlier or key not in now:
        return False
    return any(now[key] is off for off in OFF_VALUES) or \
        (key in OFF_SETTINGS and not isinstance(now[key], bool) and now[key] == OFF_SETTINGS[key])


def _differs(earlier: Any, now: Any, earlier_dir: Any, now_dir: Any) -> bool:
    """Whether a value changed, other than as a path derived from data_dir changes with it: the earlier data_dir,
    or a path under it, that reads the same under the new one is no difference."""
    if earlier == now:
        return False
    if not all(isinstance(text, str) for text in (earlier, now, earlier_dir, now_dir)):
        return True
    if earlier == earlier_dir:
        return now != now_dir
    prefix = earlier_dir.rstrip("/") + "/"
    return not earlier.startswith(prefix) or now != now_dir.rstrip("/") + "/" + earlier[len(prefix):]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {key: value for name, child in node.items() for key, value in _flatten(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): node}


def checkpoint_state(run: Training, progress: Progress, summary: dict[str, Any]) -> dict[str, Any]:
    """Everything an exact continuation needs (the data order is not stored: it is a function of (seed, epoch)).

    Under DDP a collective: `ranks` holds every process's own random generators and epoch statistics so far.
    """
    trained = progress.epoch + (0 < progress.batch >= run.plan.batches_in(progress.epoch))  # epochs fully trained
    return {
        "model": run.network.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": trained, "step": progress.step, "seed": run.settings.seed,
        "rng": _rng_states(), "progress": progress.state_dict(), "summary": summary, "clock": run.clock.state(),
        "config": run.spec.config,  # whose checkpoint this is: resume refuses one copied from another run
        "ranks": run.team.gather({"rng": _rng_states(), "totals": progress.totals.state_dict()}),
    }


def own_share(state: dict[str, Any], world: World) -> dict[str, Any]:
    """The checkpoint as this process continues it: its own random generators and epoch statistics (from
    `ranks`), refused when it was written by another number of processes, whose shards were not these."""
    shares = state.get("ranks") or [{"rng": state["rng"], "totals": state["progress"]["totals"]}]
    if len(shares) != world.world_size:
        raise CheckpointError(f"the checkpoint was written by a run over {len(shares)} process(es), and this one has "
                              f"{world.world_size}: continue it with as many (torchrun --nproc_per_node="
                              f"{len(shares)}), or add resume=false to start over")
    own = shares[world.rank]
    return {**state, "rng": own["rng"], "progress": {**state["progress"], "totals": own["totals"]}}


def restore(run: Training, state: dict[str, Any]) -> Progress:
    """Load a checkpoint's weights, optimizer, schedule and random generators into `run`; return its progress."""
    try:
        run.network.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state["scaler"] is not None:
            run.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(f"the checkpoint does not match this run ({str(error).splitlines()[0]}): add "
                              f"resume=false to start over") from None
    _set_rng_states(state["rng"])
    return Progress.from_state(state["progress"], next(run.network.parameters()).device)


def _rng_states() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "cached_gaussian": cached},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
