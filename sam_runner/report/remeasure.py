"""`sam-measure`: the sharpness of a saved run measured again, added to its summary.json beside the earlier ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sam_runner.errors import ConfigError
from sam_runner.report import saved_run
from sam_runner.run import rundir
from sam_runner.run.checkpoint import write_json_atomic
from sam_runner.run.measurement import add_measurement, measures_for, take_measurement


def measure_checkpoint(run_dir: Path, *, checkpoint_path: Path | None = None, measures: str | None = None,
                       rho: float | None = None, num_samples: int | None = None, device: str | None = None,
                       before_writing: Callable[[], None] | None = None) -> dict[str, float]:
    """Rebuild a finished (or interrupted) run from run.json, load its weights, measure them and add the
    measurement to its summary.json beside the earlier ones.

    A run still training is refused: it rewrites summary.json. The run directory is held (its lock) while
    measuring, so that no run starts there before the measurement is written; a run continued later keeps it.
    `before_writing` is called once the measurement is taken, just before summary.json is written (sam-measure:
    from then on a stop is ignored, the measurement being recorded).
    """
    rundir.refuse_if_held(run_dir)  # before the (possibly slow) rebuild
    _summary(run_dir)
    run = saved_run.load(run_dir, checkpoint_path=checkpoint_path,
                         overrides={"sharpness.measures": measures, "sharpness.rho": rho,
                                    "sharpness.num_samples": num_samples, "device": device})
    measures = measures_for(run.model, run.settings, run.data.sharpness)
    if not measures:
        raise ConfigError("no sharpness measure selected (the run trained with sharpness.measures=[]): pass "
                          "--measures auto or a comma-separated list")
    with rundir.claim(run_dir, tidy=False, by="sam-measure"):
        record = take_measurement(run.model, run.data.sharpness, measures, run.settings, epoch=run.state["epoch"],
                                  step=run.state.get("step", 0), source="sam-measure")
        if before_writing is not None:
            before_writing()
        summary = _summary(run_dir)
        add_measurement(summary, record)
        write_json_atomic(summary, run_dir / rundir.SUMMARY)
    return record["values"]


def _summary(run_dir: Path) -> dict:
    """The run's summary.json, which the measurement is added to: one that is missing or torn is not replaced by
    one holding the measurement alone (the run's results would be lost from it)."""
    try:
        return rundir.read_record(run_dir, rundir.SUMMARY)
    except rundir.UnreadableRecord as error:
        raise rundir.UnreadableRecord(f"{error}: re-run the run's own command (it rewrites summary.json from its "
                                      f"checkpoint), then measure") from None
