"""SAM switched on late (`sam_start`, Zhou et al. 2024): the base optimizer alone for the first
round(sam_start x total steps) steps, SAM steps from there on, the base optimizer's state and the lr schedule
carrying over. Checked against a hand-made sequence in float64, bit for bit against today's SAM run at sam_start=0,
through the refusals, exact resume around the switch, the epoch statistics, compile's warm-up, fp16, m-sharpness,
accumulation and two processes.
"""

from __future__ import annotations

import copy
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_json, run_cli, run_in_process
from hydra import compose, initialize_config_dir
from test_compile import GraphCounter, _bn_net
from test_ranks import torchrun
from test_resume import assert_same_run, metric_lines
from torch import nn

from sam_runner.cli.preflight import CONFIG_DIR
from sam_runner.errors import ConfigError
from sam_runner.optim import SAM
from sam_runner.run import build
from sam_runner.run.build import build_data, compile_model
from sam_runner.run.logbook import Stopwatch
from sam_runner.run.measurement import training_passes
from sam_runner.run.plan import make_plan
from sam_runner.run.progress import StepTotals
from sam_runner.run.resume import config_differences
from sam_runner.run.spec import make_spec, validate
from sam_runner.scale import distributed
from sam_runner.steps import StepResult, train_step

# TINY: 256 samples in batches of 64, 4 steps an epoch; 3 epochs = 12 steps, so sam_start=0.5 switches at step 6,
# in the middle of epoch 2 (an epoch of base and SAM steps). No sharpness measure: these compare the training.
LATE = [*TINY, "optimizer=sam", "epochs=3", "sharpness.measures=[]"]


def float64_net(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A float64 MLP (tanh) with weights drawn from its own generator: the test builds the run's initial model."""
    generator = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.Tanh(), nn.Linear(16, num_classes))
    net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    net.register_forward_pre_hook(lambda module, args: (args[0].double(),))  # float32 batches in
    return net


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


BASES = {  # the base optimizer as the runner's config builds it, written out by hand
    "sgd": (["optimizer/base=sgd", "lr=0.2", "optimizer.base.build.momentum=0.9",
             "optimizer.base.build.weight_decay=0.0005"],
            partial(torch.optim.SGD, momentum=0.9, weight_decay=5e-4), 0.2),
    "adamw": (["optimizer/base=adamw", "lr=0.01", "optimizer.base.build.weight_decay=0.01"],
              partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), 0.01),
}


def hand_made(overrides: list[str], make_base: Any, peak_lr: float, rho: float, switch: int
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`switch` steps of the base optimizer (torch.optim, one forward/backward each), then SAM (built from its
    documented API around the same base optimizer class, given the base optimizer's state by load_state_dict)
    with the closure form of `SAM.step`; the lr follows the cosine closed form over all steps throughout."""
    spec = make_spec(config(*overrides))
    data = build_data(spec, torch.device("cpu"))  # the run's batches: its data order is a function of (seed, epoch)
    batches = [batch for epoch in range(spec.settings.epochs) for batch in data.train.epoch(epoch)]
    model = float64_net(data.num_classes, data.input_shape)
    total = len(batches)
    optimizer = make_base(model.parameters(), lr=peak_lr)
    for step, (x, y) in enumerate(batches):
        if step == switch:  # from here on SAM, continuing the base optimizer's momenta / moments
            sam = SAM(model.parameters(), make_base, rho=rho, lr=peak_lr)
            sam.load_state_dict(optimizer.state_dict())
            optimizer = sam
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * 0.5 * (1 + math.cos(math.pi * step / total))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step < switch:
            optimizer.step()
        else:
            def closure() -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            optimizer.step(closure)
    return model, optimizer


@pytest.mark.parametrize(("base", "sam_start", "switch", "accumulate"), [
    ("sgd", 0.5, 6, 1), ("sgd", 0.25, 3, 2), ("sgd", 0.0, 0, 1), ("adamw", 0.5, 6, 1)])
def test_a_late_switch_is_base_optimizer_steps_then_sam_steps_from_their_state(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, base: str, sam_start: float, switch: int,
        accumulate: int) -> None:
    """float64: the run's weights and optimizer state after 12 steps equal the hand-made sequence's (accumulate=2:
    the same steps in micro-batches)."""
    base_overrides, make_base, peak_lr = BASES[base]
    overrides = [*LATE, *base_overrides, "model=custom", "model._target_=test_sam_start.float64_net",
                 "scheduler=cosine", "scheduler.warmup_epochs=0", "scheduler.min_lr_fraction=0", "rho=0.1",
                 "data_dir=data"]
    run_dir = run_in_process(workdir, monkeypatch, *overrides, f"sam_start={sam_start}", f"accumulate={accumulate}")
    model, optimizer = hand_made(overrides, make_base, peak_lr, rho=0.1, switch=switch)
    assert read_json(run_dir / "summary.json")["sam_start_step"] == switch
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["1.weight"].dtype == torch.float64
    for name, value in model.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-10, atol=1e-12, msg=name)
    for index, expected in optimizer.state_dict()["state"].items():
        for key, value in expected.items():
            torch.testing.assert_close(state["optimizer"]["state"][index][key], value, rtol=1e-10, atol=1e-12,
                                       msg=f"{index} {key}")
    if switch == 6:  # and the switch matters: SAM from the start is another run
        sam_only, _ = hand_made(overrides, make_base, peak_lr, rho=0.1, switch=0)
        assert not torch.allclose(sam_only[1].weight, model[1].weight, rtol=1e-6)


def test_sam_start_zero_is_bit_identical_to_the_sam_run_without_the_switch(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sam_start=0 against a run whose loop hands every step to the SAM optimizer as before sam_start existed (its
    m-sharpness too): the same weights, optimizer state, metrics and summary but for the two new keys."""
    overrides = [*LATE, "model=cnn1d", "optimizer.sam.micro_batch_size=32", "data_dir=data"]
    run_in_process(workdir, monkeypatch, *overrides, "sam_start=0", run_dir="zero")
    with monkeypatch.context() as patched:
        patched.setattr(build.Training, "step_optimizer", lambda self, step: self.optimizer)
        run_in_process(workdir, monkeypatch, *overrides, run_dir="before")
    assert_same_run(workdir / "zero", workdir / "before")
    summary = read_json(workdir / "zero" / "summary.json")
    assert (summary["sam_start"], summary["sam_start_step"]) == (0.0, 0)


@pytest.mark.parametrize(("overrides", "message"), [
    (["optimizer=sgd", "sam_start=0.5"], "sam_start needs a SAM optimizer"),
    (["optimizer=adamw", "sam_start=0.1"], "sam_start needs a SAM optimizer"),
    (["optimizer=sam", "sam_start=1"], "sam_start must be a fraction of the budget in [0, 1) (got 1.0)"),
    (["optimizer=asam", "sam_start=-0.1"], "sam_start must be a fraction of the budget in [0, 1) (got -0.1)"),
    (["optimizer=sam", "sam_start=nan"], "sam_start must be a finite number"),
])
def test_out_of_range_or_plain_optimizer_sam_start_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(config(*overrides))
    for name in ("sam", "asam", "asam_davda54"):  # every SAM optimizer takes it
        validate(config(f"optimizer={name}", "sam_start=0.5"))


def test_a_plain_optimizer_with_sam_start_is_refused_in_one_line_before_anything_is_written(workdir: Path) -> None:
    result = run_cli("sam-run", *TINY, "optimizer=sgd", "sam_start=0.5", "hydra.run.dir=run", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "sam_start needs a SAM optimizer" in result.stderr
    assert not (workdir / "run").exists()


def test_the_switch_step_is_a_fraction_of_the_budget_in_steps_whichever_the_budget() -> None:
    assert make_plan(validate(config("optimizer=sam", "sam_start=0.5", "epochs=10")), 7).sam_start_step == 35
    assert make_plan(validate(config("optimizer=sam", "sam_start=0.3", "budget=steps", "steps=1000")),
                     7).sam_start_step == 300
    assert make_plan(validate(config("optimizer=sam", "sam_start=0.01", "epochs=2")), 10).sam_start_step == 0
    assert make_plan(validate(config("optimizer=sam", "epochs=2")), 10).sam_start_step == 0
    plan = make_plan(validate(config("optimizer=sam", "sam_start=0.5", "epochs=2")), 10)
    assert [step for step in range(20) if plan.sam_on(step)] == list(range(10, 20))
    with pytest.raises(ConfigError, match=r"^sam_start=0.98 of a 20-step budget switches SAM on at step 20, after "):
        make_plan(validate(config("optimizer=sam", "sam_start=0.98", "epochs=2")), 10)
    # the passes the run trains, which `auto` weighs measurements against: SAM's second pass after the switch only
    assert training_passes(100, 4000, sam=0.5, every=0) == 1_200_000


def test_a_run_from_before_sam_start_existed_continues_and_only_sam_start_off_matches_it() -> None:
    earlier = {"lr": 0.1, "optimizer": {"name": "sam"}}
    assert config_differences(earlier, {**earlier, "sam_start": 0.0}) == []
    assert config_differences(earlier, {**earlier, "sam_start": 0}) == []  # as typed on a command line
    assert config_differences(earlier, {**earlier, "sam_start": 0.5}) == ["sam_start: (absent) -> 0.5"]


def test_sam_statistics_are_averaged_over_the_sam_steps_of_an_epoch() -> None:
    def result(loss: float, perturbed: float | None = None) -> StepResult:
        sam = {} if perturbed is None else {"perturbed_loss": torch.tensor(perturbed),
                                            "perturbed_correct": torch.tensor(3),
                                            "perturbation_norm": torch.tensor(perturbed / 10)}
        return StepResult(torch.tensor(loss), torch.tensor(2), torch.tensor(1.0), **sam)

    totals = StepTotals()
    totals.add(result(4.0), 8)  # a base step
    totals.add(result(2.0, perturbed=3.0), 4)  # two SAM steps, of 4 and 2 samples
    totals.add(result(1.0, perturbed=6.0), 2)
    means = totals.means()
    assert means["train/loss_seen"] == pytest.approx((32 + 8 + 2) / 14)  # every step's
    assert means["train/loss_perturbed"] == pytest.approx((12 + 12) / 6)  # the SAM steps' samples only
    assert means["train/acc_perturbed"] == pytest.approx(6 / 6)
    assert means["opt/perturbation_norm"] == pytest.approx((0.3 + 0.6) / 2)  # per SAM step
    again = StepTotals.from_state(totals.state_dict(), torch.device("cpu"))  # as a checkpoint holds them
    assert again.means() == means
    older = totals.state_dict()
    del older["counts"]  # a checkpoint written before the counts: every statistic was every step's
    assert StepTotals.from_state(older, torch.device("cpu")).means()["train/loss_perturbed"] == \
        pytest.approx(24 / 14)


def test_a_run_records_and_logs_its_switch_and_its_mixed_epoch_shows_sam_statistics_of_its_sam_steps(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sam_runner")
    run_dir = run_in_process(workdir, monkeypatch, *LATE, "sam_start=0.5", "data_dir=data")
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed"
    assert (summary["sam_start"], summary["sam_start_step"], summary["optimizer"]) == (0.5, 6, "sam")
    assert caplog.text.count("SAM switched on") == 1
    assert "step 6: SAM switched on (sam_start=0.5)" in caplog.text
    lines = metric_lines(run_dir)
    assert "train/loss_perturbed" not in lines[0] and "opt/perturbation_norm" not in lines[0]  # base steps only
    assert lines[1]["opt/perturbation_norm"] == pytest.approx(0.05, rel=1e-5)  # ρ: the SAM steps' mean, not half
    assert lines[2]["opt/perturbation_norm"] == pytest.approx(0.05, rel=1e-5)
    plain = run_in_process(workdir, monkeypatch, *TINY, "optimizer=sgd", "epochs=3", "sharpness.measures=[]",
                           "data_dir=data", run_dir="sgd")
    assert read_json(plain / "summary.json")["sam_start"] is None  # a SAM-only hyper-parameter
    assert read_json(plain / "summary.json")["sam_start_step"] is None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    (workdir / "data").mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_in_process(workdir, monkeypatch, *LATE, "model=cnn1d", "sam_start=0.5",
                              "checkpoint.every_steps=1", "data_dir=data")


@pytest.mark.parametrize("killed_at", [3, 6, 9])  # before the switch, at the first SAM step, after it
def test_a_run_killed_before_at_or_after_the_switch_continues_exactly(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: Path, killed_at: int) -> None:
    """A kill (as -9: nothing of the run's own handling runs) as step `killed_at` + 1 starts, a checkpoint after
    every step; re-running continues at the right kind of step and ends as the run that was never stopped."""
    original = distributed.distributed_step
    taken = []

    def killed(*args: Any, **kwargs: Any) -> StepResult:
        if len(taken) == killed_at:
            raise SystemExit(137)
        taken.append(isinstance(args[3], SAM))
        return original(*args, **kwargs)

    overrides = [*LATE, "model=cnn1d", "sam_start=0.5", "checkpoint.every_steps=1", "data_dir=data"]
    with monkeypatch.context() as patched:
        patched.setattr(distributed, "distributed_step", killed)
        with pytest.raises(SystemExit):
            run_in_process(workdir, monkeypatch, *overrides)
    assert taken == [step >= 6 for step in range(killed_at)]
    assert torch.load(workdir / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == killed_at
    run_in_process(workdir, monkeypatch, *overrides)
    assert_same_run(workdir / "run", uninterrupted)


def test_compile_warms_up_the_base_steps_whole_batches_and_the_sam_steps_chunks(workdir: Path) -> None:
    """With m-sharpness the base steps before the switch forward other batch sizes than SAM's chunks: warmed up
    with base_steps (training forwards of the whole batches 64 and 58 too), an epoch of both kinds and the
    evaluations compile nothing new."""
    cfg = config(*TINY, "optimizer=sam", "optimizer.sam.micro_batch_size=24", "dataset.source.num_train=250",
                 "data_dir=" + str(workdir / "data"))
    data = build_data(make_spec(cfg), torch.device("cpu"))

    def net() -> nn.Module:
        model = _bn_net()
        model[0], model[-1] = nn.Conv1d(1, 6, 3, padding=1), nn.Linear(6 * 40, data.num_classes)
        return model

    for base_steps, whole in ((True, {64, 58}), (False, set())):  # the sizes warmed up, on an eager model
        model, sizes = net(), set()
        model.register_forward_pre_hook(lambda module, args: sizes.add(len(args[0])) if module.training else None)
        build._warm_up(model, data, None, 24, base_steps=base_steps)
        assert sizes == {24, 16, 10} | whole  # SAM's chunks of 64 and 58, and the base steps' whole batches
    torch._dynamo.reset()
    try:
        model = net()
        before = copy.deepcopy(model.state_dict())
        counter = GraphCounter()
        compile_model(model, data, None, cfg.optimizer.sam, Stopwatch(), backend=counter, base_steps=True)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
        compiled = counter.graphs
        optimizer = SAM(model.parameters(), partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.05)
        for i, (inputs, targets) in enumerate(data.train.epoch(0)):  # 64, 64, 64, 58: base steps, then SAM
            sam = i >= 2
            train_step(model, inputs, targets, optimizer if sam else optimizer.base_optimizer, F.cross_entropy,
                       micro_batch_size=24 if sam else None)
        assert counter.graphs == compiled
    finally:
        torch._dynamo.reset()


def test_fp16_m_sharpness_and_accumulation_train_their_base_steps_as_the_base_optimizer(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the switch a run trains as its base optimizer would: its first epoch (base steps only) is the same
    with and without m-sharpness, and in fp16 one GradScaler goes on across the switch (skipped steps counted in
    every epoch); after it, m-sharpness changes the training."""
    common = [*LATE, "sam_start=0.5", "data_dir=data", "accumulate=2"]
    for precision in ("fp32", "fp16"):
        run_in_process(workdir, monkeypatch, *common, f"precision={precision}", run_dir=f"{precision}_whole")
        run_in_process(workdir, monkeypatch, *common, f"precision={precision}", "optimizer.sam.micro_batch_size=16",
                       run_dir=f"{precision}_chunks")
        whole, chunks = (metric_lines(workdir / f"{precision}_{name}") for name in ("whole", "chunks"))
        assert whole[0] == chunks[0]
        assert whole[2]["train/loss_seen"] != chunks[2]["train/loss_seen"]
        assert whole[1]["train/loss_perturbed"] != chunks[1]["train/loss_perturbed"]  # each chunk its own ε
        if precision == "fp16":
            assert all("opt/skipped_steps" in line for line in whole)
            state = torch.load(workdir / "fp16_whole" / "checkpoints" / "last.pt", weights_only=True)
            assert state["scaler"] is not None and state["scaler"]["scale"] > 0


@pytest.mark.slow
def test_two_processes_switch_at_the_same_step_and_train_as_one(workdir: Path) -> None:
    """Under DDP (gloo, global mode) both ranks take base steps, then SAM steps, from the same step: the weights
    equal one process's (a rank switching alone would hang or diverge)."""
    overrides = [*TINY, "optimizer=sam", "batch_size=48", "epochs=3", "sharpness.measures=[]", "sam_start=0.4"]
    two = torchrun(*overrides, "hydra.run.dir=two", cwd=workdir)
    assert two.returncode == 0, two.stderr
    one = run_cli("sam-run", *overrides, "hydra.run.dir=one", cwd=workdir, extra_env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    summary, alone = (read_json(workdir / name / "summary.json") for name in ("two", "one"))
    assert summary["world_size"] == 2 and summary["sam_start_step"] == alone["sam_start_step"] == 7  # of 18 steps
    assert (workdir / "two" / "sam-run.log").read_text().count("SAM switched on") == 1
    ours, theirs = (torch.load(workdir / name / "checkpoints" / "last.pt", weights_only=True) for name in ("two", "one"))
    for name, tensor in theirs["model"].items():
        torch.testing.assert_close(ours["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    ours_lines, their_lines = metric_lines(workdir / "two"), metric_lines(workdir / "one")
    assert ours_lines[1]["opt/perturbation_norm"] == pytest.approx(their_lines[1]["opt/perturbation_norm"], rel=1e-5)
    assert ours_lines[1]["train/loss_perturbed"] == pytest.approx(their_lines[1]["train/loss_perturbed"], rel=1e-4)
