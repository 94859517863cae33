"""Starting from another run's weights (`init_from`, run/checkpoint.py's `initial_weights`): exactly its weights and
nothing else of it, recorded, and a model they do not fit refused in one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, read_json, run_cli, run_in_process
from test_rundir import one_line

from sam_runner.errors import CheckpointError
from sam_runner.models import mlp
from sam_runner.report.runs import collect
from sam_runner.report.stats import group_runs
from sam_runner.run.checkpoint import initial_weights

SHORT = [*TINY, "epochs=1", "sharpness.measures=[]"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished SGD run to start from."""
    workdir = tmp_path_factory.mktemp("source")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_in_process(workdir, monkeypatch, *SHORT, "seed=7", run_dir="source")


def test_a_run_starts_from_exactly_the_source_weights_and_records_them(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, source: Path) -> None:
    """lr = 1e-30 moves no float32 weight: the run's last weights are the source's, bit for bit, and not those
    of its own seed's initialization; the optimizer (SAM here, the source's SGD) starts afresh."""
    tiny_lr = [*SHORT, "optimizer=sam", "lr=1e-30"]
    run_in_process(workdir, monkeypatch, *tiny_lr, f"init_from={source}")
    run_in_process(workdir, monkeypatch, *tiny_lr, run_dir="fresh")
    for name, tensor in weights(source).items():
        assert torch.equal(weights(workdir / "run")[name], tensor), name
    assert any(not torch.equal(weights(workdir / "fresh")[name], tensor) for name, tensor in weights(source).items())
    summary = read_json(workdir / "run" / "summary.json")
    assert summary["init_from"] == str(source) and summary["optimizer"] == "sam"
    assert summary["init_source"] == {"path": str((source / "checkpoints" / "last.pt").resolve()), "epoch": 1,
                                      "step": 4}
    assert read_json(workdir / "run" / "run.json")["config"]["init_from"] == str(source)
    assert read_json(workdir / "fresh" / "summary.json")["init_from"] is None


def test_initial_weights_take_a_checkpoint_file_and_refuse_what_does_not_fit(source: Path) -> None:
    model = mlp(num_classes=10, input_shape=(1, 40))
    initial_weights(source / "checkpoints" / "last.pt", model)
    for name, tensor in weights(source).items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(CheckpointError, match=r"its weights do not fit this model \(size mismatch for "):
        initial_weights(source, mlp(num_classes=10, input_shape=(1, 40), hidden=[7, 7]))
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        initial_weights(source / "nothing", model)


def test_a_model_the_weights_do_not_fit_is_one_line_and_exit_2_with_nothing_written(
        workdir: Path, source: Path) -> None:
    result = run_cli("sam-run", *SHORT, "model.hidden=[7]", f"init_from={source}", "hydra.run.dir=run", cwd=workdir)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"sam-run: error: init_from={source}: its weights do not fit this model")
    assert not (workdir / "run").exists()


def test_init_from_is_recorded_as_written_so_that_each_seed_s_own_source_still_groups_the_seeds(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, source: Path) -> None:
    """`init_from=.../seed_${seed}` (a study whose seeds each continue their own fit): summary.json keeps the setting
    as written, which the seeds share, and init_source the file each loaded; sam-report puts them in one group."""
    for seed in (1, 2):
        (workdir / "fits").mkdir(exist_ok=True)
        (workdir / "fits" / f"seed_{seed}").symlink_to(source)
    for seed in (1, 2):
        run_in_process(workdir, monkeypatch, *SHORT, f"seed={seed}", "init_from=fits/seed_${seed}",
                       run_dir=f"runs/{seed}")
    summaries = [read_json(workdir / "runs" / str(seed) / "summary.json") for seed in (1, 2)]
    assert [summary["init_from"] for summary in summaries] == ["fits/seed_${seed}"] * 2
    assert [summary["init_source"]["path"] for summary in summaries] == [
        str((workdir / "fits" / f"seed_{seed}" / "checkpoints" / "last.pt").resolve()) for seed in (1, 2)]
    (group,) = group_runs(collect(workdir / "runs"))
    assert len(group.completed) == 2
