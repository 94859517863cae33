"""The installed `sam-run` / `sam-measure`, end to end on tiny data: files, keys, sweeps, a user's config dir, bad
input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_json, run_cli
from omegaconf import OmegaConf

SUMMARY_KEYS = {"train_acc", "test_acc", "train_loss", "test_loss", "gap_acc", "gap_loss", "status",
                "epochs_completed", "wall_time_s", "sharpness", "optimizer", "base_optimizer", "rho", "batch_size",
                "lr", "seed", "dataset", "model"}


@pytest.fixture(scope="module")
def sam_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SAM run shared by the tests that only read its outputs."""
    workdir = tmp_path_factory.mktemp("single")
    result = run_cli("sam-run", *TINY, "optimizer=sam", "rho=0.05", "hydra.run.dir=outputs/run", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir / "outputs" / "run"


def test_single_run_writes_summary_with_every_key(sam_run_dir: Path) -> None:
    summary = read_json(sam_run_dir / "summary.json")
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert summary["optimizer"] == "sam" and summary["base_optimizer"] == "sgd" and summary["rho"] == 0.05
    for key in ("train_acc", "test_acc"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["gap_acc"] == pytest.approx(summary["train_acc"] - summary["test_acc"])
    assert summary["gap_loss"] == pytest.approx(summary["test_loss"] - summary["train_loss"])
    assert set(summary["sharpness"]) >= {"ascent", "lambda_max"}


def test_single_run_writes_metrics_run_info_checkpoint_and_one_tensorboard_run(sam_run_dir: Path) -> None:
    lines = [json.loads(line) for line in (sam_run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    expected = {"train/loss", "train/acc", "train/loss_seen", "train/acc_seen", "train/loss_perturbed",
                "train/acc_perturbed", "test/loss", "test/acc", "gap/acc", "gap/loss", "opt/lr", "opt/grad_norm",
                "opt/perturbation_norm", "opt/epoch_time_s", "opt/images_per_s"}
    assert expected <= lines[0].keys()
    assert "sharpness/ascent" in lines[-1]
    info = read_json(sam_run_dir / "run.json")
    assert {"argv", "config", "versions", "device", "git_sha"} <= info.keys()
    assert info["config"]["optimizer"]["name"] == "sam" and info["versions"]["torch"]
    # the sam_runner the installed sam-run imports (a test run from the checkout may import the checkout's own)
    imported = subprocess.run([sys.executable, "-c", "import sam_runner; print(sam_runner.__file__)"],
                              cwd=sam_run_dir, capture_output=True, text=True, check=True)
    source = Path(imported.stdout.strip()).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True)
    in_checkout = head.returncode == 0 and (source.parent / ".git").exists()
    assert info["git_sha"] == (head.stdout.strip() if in_checkout else None)
    state = torch.load(sam_run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng"} <= state.keys()
    event_files = list(sam_run_dir.rglob("events.out.tfevents.*"))
    assert [path.parent for path in event_files] == [sam_run_dir], "hparams must not create a second run"
    hydra_record = sam_run_dir / ".hydra"  # Hydra's record of the job, written by sam-run once the run started
    assert OmegaConf.load(hydra_record / "config.yaml").optimizer.name == "sam"
    assert "rho=0.05" in OmegaConf.load(hydra_record / "overrides.yaml")
    assert OmegaConf.load(hydra_record / "hydra.yaml").hydra.runtime.output_dir == str(sam_run_dir.resolve())


def test_tensorboard_has_the_metric_tags(sam_run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sam_run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/acc", "test/acc", "gap/acc", "opt/lr", "sharpness/lambda_max"} <= tags
    assert [event.step for event in events.Scalars("test/acc")] == [4, 8]  # global step: 4 steps per epoch


def test_hparams_record_is_in_the_runs_own_event_file(sam_run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (event_file,) = sam_run_dir.glob("events.out.tfevents.*")
    tags = {value.tag for event in EventFileLoader(str(event_file)).Load() for value in event.summary.value}
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= tags


def test_sweep_runs_every_job_skips_plain_duplicates_and_prints_a_table(workdir: Path) -> None:
    result = run_cli("sam-run", "-m", *TINY, "sharpness.measures=[]", "optimizer=sgd,sam", "rho=0.02,0.05",
                     "hydra.sweep.dir=outputs/sweep", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summaries = {path.parent.name: read_json(path) for path in (workdir / "outputs" / "sweep").glob("*/summary.json")}
    assert len(summaries) == 4
    by_setting = {(s["optimizer"], s.get("rho"), s["status"]) for s in summaries.values()}
    assert ("sgd", None, "completed") in by_setting and ("sgd", None, "duplicate") in by_setting
    assert {("sam", 0.02, "completed"), ("sam", 0.05, "completed")} <= by_setting
    table = result.stdout[result.stdout.index("test_acc") - 200:]
    assert "run" in table and "duplicate" in table and "completed" in table


def test_a_users_config_dir_adds_options_to_the_groups(workdir: Path) -> None:
    (workdir / "my_configs" / "model").mkdir(parents=True)
    (workdir / "my_configs" / "model" / "wide_mlp.yaml").write_text(
        "# a wider MLP\n_target_: sam_runner.models.mlp\nhidden: [64, 64]  # widths of the hidden layers\n")
    result = run_cli("sam-run", "--config-dir", "my_configs", *TINY, "model=wide_mlp", "sharpness.measures=[]",
                     "epochs=1", "hydra.run.dir=outputs/mine", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert read_json(workdir / "outputs" / "mine" / "summary.json")["model"] == "wide_mlp"
    unknown = run_cli("sam-run", "--config-dir", "my_configs", *TINY, "model=narrow_mlp", cwd=workdir)
    assert unknown.returncode == 2 and "wide_mlp" in unknown.stderr  # the user's option is listed too


@pytest.mark.parametrize("override, message", [
    ("optimizer=foo", "unknown optimizer 'foo'; choose one of: adamw, asam, asam_davda54, esam, fsam, gsam, looksam, sam, sam_on, sgd, usam"),
    ("optimizer/base=lion", "unknown optimizer/base 'lion'"),
    ("rho=-0.1", "rho must be >= 0"),
    ("rho=abc", "rho: Value 'abc'"),
    ("batch_size=0", "batch_size must be > 0"),
    ("accumulate=65", "accumulate must be an integer in [1, batch_size=64] micro-batches per optimizer step (got 65)"),
    ("accumulate=2.5", "accumulate: Value '2.5' of type 'float' could not be converted to Integer"),
    ("rhoo=0.1", "unknown key 'rhoo'"),
    ("device=gpu", "expected one of [auto, cpu, cuda]"),
    ("model=custom", "model._target_ must be set"),
    ("sharpness.measures=[sharpest]", "sharpness.measures: unknown sharpness measure(s) ['sharpest']"),
    ("rho=inf", "rho must be a finite number (got inf)"),
    ("hydra.run.dir=", "hydra.run.dir is empty"),
    # what the builders would refuse only after making the run directory, checked without data
    ("model._target_=nowhere.model", "model._target_: cannot import nowhere.model"),
    ("model._target_=.relative", "model._target_: cannot import .relative (Relative imports are not supported.)"),
    ("+dataset.source.typo=1", "dataset.source (sam_runner.data.synthetic): got an unexpected keyword argument"),
    ("dataset.source.num_train=0", "dataset.source.num_train must be a positive integer (got 0)"),
    ("dataset.normalize={mean:[0.5],std:[0]}", "dataset.normalize.std must be positive"),
    ("dataset.augment={crop_padding:-1}", "crop_padding must be >= 0 pixels (got -1)"),
    ("dataset.num_classes=1", "dataset.num_classes must be at least 2 classes (one class leaves nothing to learn)"),
    ("steps=-5", "steps must be > 0 optimizer updates or null (got -5)"),
    ("data_dir=/dev/null", "data_dir=/dev/null is a file, not a folder"),
    (f"hydra.run.dir=outputs/{'x' * 300}", "is 300 bytes, longer than file systems allow (255)"),
    (f"hydra.run.dir=outputs/{'/'.join(['c' * 200] * 25)}", "hydra.run.dir: File name too long (5032 bytes)"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(workdir: Path, override: str,
                                                                      message: str) -> None:
    result = run_cli("sam-run", *TINY, override, cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], "exactly one line"
    assert result.stderr.startswith("sam-run: error: ") and message in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (workdir / "outputs").exists()


def test_a_bad_value_inside_a_sweep_stops_the_sweep_before_any_run(workdir: Path) -> None:
    result = run_cli("sam-run", "-m", *TINY, "optimizer=sam", "rho=0.05,-1", cwd=workdir)
    assert result.returncode == 2 and "rho must be >= 0 (got -1" in result.stderr
    assert not (workdir / "outputs").exists()


def test_a_clashing_combination_in_a_sweep_stops_it_before_any_run(workdir: Path) -> None:
    """Each value is valid alone; batch 16 with micro-batch 64 is not."""
    result = run_cli("sam-run", "-m", *TINY, "optimizer=sam", "batch_size=16,256",
                     "optimizer.sam.micro_batch_size=8,64", cwd=workdir)
    assert result.returncode == 2 and "micro_batch_size must be null or in [1, batch_size=16] (got 64)" in result.stderr
    assert not (workdir / "outputs").exists()


def test_fewer_classes_than_the_labels_is_bad_input(workdir: Path) -> None:
    result = run_cli("sam-run", *TINY, "dataset.source.num_classes=10", "dataset.num_classes=4",
                     "hydra.run.dir=outputs/run", cwd=workdir)
    assert result.returncode == 2 and result.stderr.strip() == (
        "sam-run: error: dataset.num_classes=4, but the labels go from 0 to 9: labels must be class indices 0..3; "
        "set dataset.num_classes=10, or null to infer it from the labels")


def test_a_clash_hidden_in_one_combination_of_a_large_sweep_stops_it_before_any_run(workdir: Path) -> None:
    """120 jobs: each value is valid with the others' first values; only batch 16 with micro-batch 64 clashes."""
    result = run_cli("sam-run", "-m", *TINY, "optimizer=sam", "batch_size=256,16", "optimizer.sam.micro_batch_size=8,64",
                     "seed=range(30)", cwd=workdir)
    assert result.returncode == 2 and "micro_batch_size must be null or in [1, batch_size=16] (got 64)" in result.stderr
    assert not (workdir / "outputs").exists()
    from sam_runner.cli.preflight import hydra_arguments, preflight
    from sam_runner.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'optimizer.sam.etaa'"):  # each job's config stays strict
        preflight(hydra_arguments(["-m", "optimizer=sam,asam", "optimizer.sam.etaa=0.1,0.2", "seed=range(30)"]))


def test_a_second_sweep_into_a_sweep_directory_in_use_is_refused_before_it_runs(workdir: Path) -> None:
    from sam_runner.run import rundir

    sweep_dir = workdir / "outputs" / "sweep"
    with rundir.claim(sweep_dir):  # as the pre-flight of a sweep still running there holds it
        result = run_cli("sam-run", "-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep_dir}", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip() == f"sam-run: error: {sweep_dir} is in use by another sweep: wait for it to end, " \
                                    f"or choose another hydra.sweep.dir"
    assert sorted(path.name for path in sweep_dir.iterdir()) == [rundir.LOCK_NAME]


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="SLURM is installed here")
def test_the_slurm_launcher_without_slurm_is_one_line(workdir: Path) -> None:
    result = run_cli("sam-run", "-m", *TINY, "hydra/launcher=slurm", "seed=0,1", cwd=workdir)
    assert result.returncode == 2 and result.stderr.startswith("sam-run: error: hydra/launcher=slurm submits each job "
                                                               "with sbatch")
    assert len(result.stderr.strip().splitlines()) == 1 and not (workdir / "outputs").exists()


@pytest.mark.parametrize("argv", [
    ["optimizer=sam,asam", "optimizer.sam.eta=0.0,0.01"],  # eta exists only once the optimizer is chosen
    ["model=custom", "model._target_=sam_runner.models.mlp,sam_runner.models.cnn1d"],  # _target_ needs model=custom
])
def test_valid_sweeps_whose_values_need_each_other_pass_the_preflight(argv: list[str]) -> None:
    from sam_runner.cli.preflight import hydra_arguments, preflight

    preflight(hydra_arguments(["-m", *argv]))


@pytest.mark.parametrize(("argv", "first_rho"), [
    (["optimizer=sgd,sam", "rho=0.2,0.05"], "0.2"),  # the command line's grid
    (["experiment=sharpness_notions"], "0.1"),  # a preset's grid (hydra.sweeper.params) counts too
    (["experiment=sharpness_notions", "rho=0.3,0.1"], "0.3"),  # and the command line's wins over it
    (["optimizer=sgd,sam"], None),  # no rho in the sweep: no plain run is a duplicate
])
def test_the_preflight_finds_a_sweeps_first_rho_from_which_plain_runs_are_duplicates(
        argv: list[str], first_rho: str | None) -> None:
    from sam_runner.cli.preflight import hydra_arguments, preflight

    assert preflight(hydra_arguments(["-m", *argv])).first_rho == first_rho


def test_the_preflight_builds_jobs_as_hydras_basic_sweeper_does() -> None:
    from sam_runner.cli.preflight import _jobs, _split_overrides

    fixed, by_key = _split_overrides(["batch_size=16,256", "seed=0", "rho=interval(0.01,0.5)", "+x=1", "seed=3"])
    assert fixed == ["seed=0", "+x=1", "seed=3"]
    assert by_key == {"batch_size": ["batch_size=16", "batch_size=256"], "+x": ["+x=1"], "seed": ["seed=3"]}
    assert _jobs({"a": ["a=1", "a=2"], "b": ["b=1", "b=2", "b=3"]})[:2] == [["a=1", "b=1"], ["a=1", "b=2"]]


def test_the_preflight_checks_a_presets_grid_with_the_command_lines_overrides(workdir: Path) -> None:
    """The preset sweeps batch 32/256/1000 and sgd/sam; fixing SAM with micro-batch 64 clashes with batch 32."""
    result = run_cli("sam-run", "-m", "experiment=batch_size_gap", "optimizer=sam",
                     "optimizer.sam.micro_batch_size=64", cwd=workdir)
    assert result.returncode == 2 and "batch_size=32] (got 64)" in result.stderr
    assert not (workdir / "outputs").exists()


def test_unwritable_output_directory_is_a_clear_error(workdir: Path) -> None:
    (workdir / "blocker").write_text("a file where a directory should be")
    result = run_cli("sam-run", *TINY, "hydra.run.dir=blocker/run", cwd=workdir)
    assert result.returncode == 2 and "cannot write run outputs" in result.stderr
    assert (workdir / "blocker").read_text() == "a file where a directory should be"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_directory_that_cannot_be_made_is_one_line_even_for_root(workdir: Path, key: str) -> None:
    """/proc takes no new folder, whoever asks (permission bits would not stop root, who runs many containers)."""
    result = run_cli("sam-run", *(["-m"] if key == "hydra.sweep.dir" else []), *TINY, f"{key}=/proc/nope/x", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr == f"sam-run: error: cannot write run outputs under /proc (No such file or directory): " \
                            f"choose a writable {key}\n"


def test_missing_cifar_offline_names_the_fix(workdir: Path) -> None:
    result = run_cli("sam-run", "dataset=cifar10", "model=keskar_c1", "dataset.source.download=false",
                     "data_dir=nowhere", "hydra.run.dir=outputs/cifar", cwd=workdir)
    assert result.returncode == 2
    assert "CIFAR-10" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "outputs").exists(), "a run refused by its data leaves no directory behind"


def test_sam_measure_adds_measurements_at_two_radii_and_keeps_the_runs_own(sam_run_dir: Path, tmp_path: Path
                                                                              ) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(sam_run_dir, run_dir)  # the shared run stays as it was for the other tests
    before = read_json(run_dir / "summary.json")
    for rho in ("0.1", "0.2"):
        result = run_cli("sam-measure", str(run_dir), "--measures", "ascent,average", "--rho", rho, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "average" in result.stdout
    summary = read_json(run_dir / "summary.json")
    assert summary["sharpness"] == before["sharpness"]  # the run's own end-of-run values stay
    own, *added = summary["measurements"]
    assert own == before["measurements"][0] and own["source"] == "sam-run" and own["rho"] == 0.05
    assert [(m["source"], m["rho"]) for m in added] == [("sam-measure", 0.1), ("sam-measure", 0.2)]
    for record in added:
        assert {"ascent", "average", "average_stderr"} <= record["values"].keys()
        assert record["epoch"] == 2 and record["model_mode"] == "eval" and record["num_samples"] == 128
        assert record["options"]["average_samples"] > 0  # every option stored with its value
    assert added[0]["values"]["ascent"] != added[1]["values"]["ascent"]  # two radii, two numbers


def test_sam_measure_without_any_measure_selected_says_so(sam_run_dir: Path, tmp_path: Path) -> None:
    result = run_cli("sam-measure", str(sam_run_dir), "--measures", "", cwd=tmp_path)
    assert result.returncode == 2 and "--measures auto" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sam_measure_refuses_a_corrupt_checkpoint_in_one_line(sam_run_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    result = run_cli("sam-measure", str(sam_run_dir), "--checkpoint", str(corrupt), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("sam-measure: error: checkpoint") and "corrupt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sweep_job_directories_stay_short_and_distinct_however_many_overrides() -> None:
    from sam_runner.cli.preflight import JOB_NAME_LIMIT, job_dirname

    assert job_dirname("optimizer/base=adamw,rho=0.1") == "optimizer-base=adamw,rho=0.1"
    long = ",".join(f"key{i}.sub=value{i}" for i in range(30))
    names = {job_dirname(long + f",seed={seed}") for seed in range(3)}
    assert len(names) == 3 and all(len(name) <= JOB_NAME_LIMIT for name in names)


def test_a_run_refused_by_its_data_leaves_a_folder_that_was_there_as_it_was(workdir: Path) -> None:
    """Only what the refused command created goes: a user's own folder named as the run directory stays."""
    (workdir / "mine").mkdir()
    (workdir / "mine" / "notes.txt").write_text("mine")
    result = run_cli("sam-run", "dataset=cifar10", "model=keskar_c1", "dataset.source.download=false",
                     "data_dir=nowhere", "hydra.run.dir=mine", cwd=workdir)
    assert result.returncode == 2 and "CIFAR-10" in result.stderr
    assert (workdir / "mine" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_sweep_job_refused_for_its_directory_ends_the_sweep_with_exit_2_and_leaves_it_out_of_the_table(
        workdir: Path) -> None:
    """Job 1's directory holds sam-run-like files but no run.json: not this sweep's run, so neither continued,
    changed, nor shown as this sweep's result (its summary.json says completed)."""
    sweep = ["-m", *TINY, "epochs=1", "seed=0,1,2", "hydra.sweep.dir=sweep"]
    assert run_cli("sam-run", *sweep[:-2], "seed=0,1", "hydra.sweep.dir=sweep", cwd=workdir).returncode == 0
    foreign = next((workdir / "sweep").glob("1_*"))
    (foreign / "run.json").unlink()

    def contents() -> dict[Path, bytes]:  # but the per-attempt files: Hydra's log, the lock's holder
        return {path: path.read_bytes() for path in foreign.rglob("*")
                if path.is_file() and path.name not in ("sam-run.log", ".lock")}

    before = contents()
    result = run_cli("sam-run", *sweep, cwd=workdir)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("sam-run: error: run 1 did not start: ") and "holds files that no sam-run wrote" in error
    assert "Traceback" not in result.stderr
    assert "sweep sweep (1 runs)" in result.stdout, result.stdout  # job 0; job 2 never started: the refusal ended it
    assert contents() == before
    jobs = sorted(path.name for path in (workdir / "sweep").iterdir() if path.is_dir())
    # resume=false is no part of a job's directory name: the same jobs start over (job 0 here), no new ones beside
    over = run_cli("sam-run", *sweep[:-2], "seed=0,1", "resume=false", "hydra.sweep.dir=sweep", cwd=workdir)
    assert over.returncode == 2 and "run 1 did not start: " in over.stderr and contents() == before
    assert "resume=false: removed the earlier run's" in over.stdout
    assert sorted(path.name for path in (workdir / "sweep").iterdir() if path.is_dir()) == jobs
