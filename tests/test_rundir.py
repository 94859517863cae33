"""Nothing lost: a refused resume changes no file, starting over removes only what a sam-run wrote, a diverged run
keeps its last finite checkpoint, a torn metrics.jsonl is repaired, and data_dir may change on resume."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, composed, read_json, run_cli, run_in_process
from test_resume import in_background

# Written by every attempt (Hydra's log of the command, the lock's holder): not part of the run's records.
PER_ATTEMPT = ("sam-run.log", ".lock")


def checksums(run_dir: Path) -> dict[str, str]:
    """sha256 of every file under `run_dir` but the per-attempt ones, by relative path."""
    return {str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(run_dir.rglob("*")) if path.is_file() and path.name not in PER_ATTEMPT}


def strict_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file parsed as strict JSON (no NaN, no Infinity, no torn line)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    text = path.read_text()
    assert text.endswith("\n"), "the last line is whole"
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def preempted(workdir: Path, run_dir: str, *overrides: str) -> None:
    """`sam-run` on TINY (long enough to be stopped in training), pre-empted by SIGTERM after its first checkpoint."""
    process = in_background(workdir, *TINY, *overrides, f"hydra.run.dir={run_dir}")
    checkpoint = workdir / run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while process.poll() is None and not checkpoint.exists():
        assert time.monotonic() < deadline, "the run never wrote a checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_before_any_record_changes(workdir: Path) -> None:
    """Two runs that differ only in the model's width: the wider one's checkpoint in the other's directory."""
    long = ["epochs=20", "checkpoint.every_steps=1"]
    assert run_cli("sam-run", *TINY, "epochs=1", "model.hidden=[120]", "hydra.run.dir=wide", cwd=workdir
                   ).returncode == 0
    preempted(workdir, "run", *long)
    own = workdir / "run" / "checkpoints" / "last.pt"
    shutil.copy(own, workdir / "own.pt")
    shutil.copy(workdir / "wide" / "checkpoints" / "last.pt", own)
    before = checksums(workdir / "run")
    refused = run_cli("sam-run", *TINY, *long, "hydra.run.dir=run", cwd=workdir)
    assert refused.returncode == 2
    assert "belongs to another run" in one_line(refused.stderr)
    assert checksums(workdir / "run") == before, "summary.json, run.json, metrics.jsonl, events: all unchanged"
    shutil.copy(workdir / "own.pt", own)
    resumed = run_cli("sam-run", *TINY, *long, "hydra.run.dir=run", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert [line["epoch"] for line in strict_lines(workdir / "run" / "metrics.jsonl")] == list(range(1, 21))
    assert read_json(workdir / "run" / "summary.json")["status"] == "completed"
    assert len(read_json(workdir / "run" / "run.json")["resumes"]) == 1


@pytest.mark.slow
def test_a_directory_no_sam_run_wrote_is_refused_and_starting_over_keeps_the_users_files(workdir: Path) -> None:
    (workdir / "proj" / "checkpoints").mkdir(parents=True)
    (workdir / "proj" / "checkpoints" / "model_final.pt").write_text("x")
    for extra in ([], ["resume=false"]):
        refused = run_cli("sam-run", *TINY, *extra, "hydra.run.dir=proj", cwd=workdir)
        assert refused.returncode == 2
        assert "holds files that no sam-run wrote" in one_line(refused.stderr)
        assert "choose another hydra.run.dir" in refused.stderr and "resume=false" not in refused.stderr
        assert sorted(str(path.relative_to(workdir / "proj")) for path in (workdir / "proj").rglob("*")) == [
            "checkpoints", "checkpoints/model_final.pt"], "nothing written, nothing removed (.hydra/ included)"
    assert run_cli("sam-run", *TINY, "epochs=1", "hydra.run.dir=run", cwd=workdir).returncode == 0
    users = [workdir / "run" / "checkpoints" / "model_final.pt", workdir / "run" / "notes.txt"]
    for path in users:
        path.write_text("mine")
    over = run_cli("sam-run", *TINY, "epochs=1", "lr=0.3", "resume=false", "hydra.run.dir=run", cwd=workdir)
    assert over.returncode == 0, over.stderr
    assert "removed the earlier run's summary.json, metrics.jsonl, checkpoints/last.pt, events.out." in over.stdout
    assert all(path.read_text() == "mine" for path in users)
    assert read_json(workdir / "run" / "run.json")["config"]["lr"] == 0.3


@pytest.mark.parametrize("run_info", ['{"tool": "mytool", "config": {"lr": 1}}', "not json", '["a list"]'])
def test_another_tools_run_json_does_not_make_its_directory_a_sam_runs(tmp_path: Path, run_info: str) -> None:
    """A run.json is a sam-run's only with the run's config and sam-runner's version in it: another tool's (or a
    broken one) beside files named like sam-run's is refused, resume=false or not, and nothing is removed."""
    from sam_runner.errors import ConfigError
    from sam_runner.run import resume

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_text("mine")
    (tmp_path / "summary.json").write_text('{"mine": true}')
    (tmp_path / "run.json").write_text(run_info)
    before = checksums(tmp_path)
    for again in (True, False):
        with pytest.raises(ConfigError, match=r"holds files that no sam-run wrote \(summary.json, run.json, "
                                              r"checkpoints/last.pt; no run.json of a sam-run\)"):
            resume.inspect(tmp_path, {"lr": 1}, resume=again)
    assert checksums(tmp_path) == before


def test_a_run_that_diverges_between_epoch_ends_keeps_a_finite_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sam_runner.run import experiment

    cfg, choices = composed(tmp_path, monkeypatch, [*TINY, "epochs=1", "lr=1e6", "checkpoint.every_steps=1"])
    summary = experiment.run_experiment(cfg, tmp_path / "run", choices=choices)
    assert summary["status"] == "diverged"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    assert 1 <= state["step"] < summary["steps_completed"]


def test_a_resumed_logbook_cuts_metrics_back_to_whole_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    """Longer than the checkpoint's offset (a kill after it): cut to the offset. Shorter (a truncated file, a torn
    last line): cut to the last whole line, saying which epochs' lines are lost. Then the next epoch's line follows
    a whole one."""
    from sam_runner.run.logbook import Logbook

    lines = [json.dumps({"epoch": epoch, "step": 4 * epoch}) + "\n" for epoch in (1, 2)]
    metrics = tmp_path / "metrics.jsonl"
    for written, offset in (("".join(lines) + '{"epoch": 3, "st', len(lines[0]) + len(lines[1])),
                            (lines[0] + lines[1][:9], len(lines[0]) + len(lines[1]))):
        metrics.write_text(written)
        logbook = Logbook(tmp_path, {}, metrics_offset=offset)
        logbook.log_metrics(9, 36, {"train/loss_seen": 0.5})
        logbook.close({})
        assert [line["epoch"] for line in strict_lines(metrics)] == ([1, 2, 9] if len(written) > offset else [1, 9])
    assert [record.getMessage().split(": ", 1)[1] for record in caplog.records] == [
        "its last whole line is epoch 1, and the lines of the epochs after it are lost from it (TensorBoard's events "
        "still hold them)"]


def test_a_value_derived_from_data_dir_may_change_with_it_and_nothing_else() -> None:
    from sam_runner.run.resume import config_differences

    earlier = {"data_dir": "data", "source": {"cache_dir": "data", "root": "data/cifar"}, "name": "data", "out": "data"}
    now = {"data_dir": "/scratch/d/", "source": {"cache_dir": "/scratch/d/", "root": "/scratch/d/cifar"},
           "name": "data", "out": "elsewhere"}
    assert config_differences(earlier, now) == ["out: data -> elsewhere"]


def test_a_run_continues_with_another_data_dir_holding_the_same_data(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed (as by `kill -9`) in its final measurement, in process; continued by `sam-run` from a copy of data/."""
    from sam_runner.run import loop

    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit(137)

    mnist1d = [*(item for item in TINY if not item.startswith("dataset")), "dataset=mnist1d",
               "dataset.source.num_samples=400"]
    monkeypatch.setattr(loop, "take_measurement", killed)
    with pytest.raises(SystemExit):
        run_in_process(workdir, monkeypatch, *mnist1d)
    shutil.copytree(workdir / "data", workdir / "moved")
    resumed = run_cli("sam-run", *mnist1d, "data_dir=moved", "hydra.run.dir=run", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing" in resumed.stdout
    assert read_json(workdir / "run" / "summary.json")["status"] == "completed"
    assert [line["epoch"] for line in strict_lines(workdir / "run" / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_a_checkpoint_of_another_run_of_the_same_model_is_refused_before_any_record_changes(workdir: Path) -> None:
    """The same network, another config (epochs): its checkpoint would load, and the run would go on as the other."""
    long = ["epochs=40", "checkpoint.every_steps=1"]
    assert run_cli("sam-run", *TINY, "epochs=1", "hydra.run.dir=other", cwd=workdir).returncode == 0
    preempted(workdir, "run", *long)
    shutil.copy(workdir / "other" / "checkpoints" / "last.pt", workdir / "run" / "checkpoints" / "last.pt")
    before = checksums(workdir / "run")
    assert any(name.startswith(".hydra/") for name in before)
    # data_dir may change on resume, so the pre-flight lets the command through: Hydra's record of it (.hydra/
    # overrides.yaml) must not be rewritten either before the checkpoint is refused
    refused = run_cli("sam-run", *TINY, *long, "hydra.run.dir=run", "data_dir=data", cwd=workdir)
    assert refused.returncode == 2
    assert "belongs to another run (" in one_line(refused.stderr) and "epochs: 1 -> 40" in refused.stderr
    assert checksums(workdir / "run") == before


def test_a_run_whose_checkpoint_is_gone_is_refused_not_started_over(workdir: Path) -> None:
    """A run that trained and checkpointed, then lost last.pt: its records are kept until the user says otherwise."""
    long = ["epochs=40", "checkpoint.every_steps=1"]
    process = in_background(workdir, *TINY, *long, "hydra.run.dir=run")
    deadline = time.monotonic() + 120
    while not (workdir / "run" / "metrics.jsonl").is_file() or not (workdir / "run" / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, "the run never logged an epoch"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75
    (workdir / "run" / "checkpoints" / "last.pt").unlink()
    before = checksums(workdir / "run")
    refused = run_cli("sam-run", *TINY, *long, "hydra.run.dir=run", cwd=workdir)
    assert refused.returncode == 2 and "no checkpoints/last.pt to continue from" in one_line(refused.stderr)
    assert checksums(workdir / "run") == before
    assert len(strict_lines(workdir / "run" / "metrics.jsonl")) >= 1
