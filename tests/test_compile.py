"""compile=true: a torch.compile'd model takes the same SAM steps as the eager one, compiles each graph once (SAM's
two passes share one; train/eval never thrash), is warmed up before the first step, and measures sharpness.

On the CPU these use the `aot_eager` backend (Dynamo's tracing and AOTAutograd's functionalization, where SAM's
in-place weight moves and BatchNorm buffer restores could go wrong, without Inductor's C++ build: 28 s for the
MNIST-1D CNN here) or a backend that only counts graphs. The `gpu`-marked variants run Inductor on CUDA.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_json, run_cli
from hydra import compose, initialize_config_dir
from torch import nn

from sam_runner import sharpness
from sam_runner.cli.preflight import CONFIG_DIR
from sam_runner.errors import ConfigError
from sam_runner.optim import ESAM, SAM
from sam_runner.run.build import batch_sizes, build_data, compile_model
from sam_runner.run.evaluation import evaluate
from sam_runner.run.logbook import Stopwatch
from sam_runner.run.spec import make_spec
from sam_runner.steps import train_step


class GraphCounter:
    """A torch.compile backend that counts the graphs it is given; it runs each as it is, or through Inductor."""

    def __init__(self, inductor: bool = False) -> None:
        self.graphs, self.inductor = 0, inductor

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(graph, example_inputs)
        return graph.forward


ON_CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(1, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 12, 4))


def _batch(n: int = 32, seed: int = 1, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, generator=g).to(device), torch.randint(0, 4, (n,), generator=g).to(device)


def _sam(model: nn.Module) -> SAM:
    return SAM(model.parameters(), partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4), rho=0.1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per code object (nn.Module.forward): start and end every test with none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("micro_batch_size", [None, 8])
@pytest.mark.parametrize(("device", "backend"), [("cpu", "aot_eager"), pytest.param("cuda", "inductor",
                                                                                     marks=pytest.mark.gpu)])
def test_compiled_sam_steps_agree_with_eager_ones(device: str, backend: str, micro_batch_size: int | None) -> None:
    eager, (x, y) = _bn_net().to(device), _batch(device=device)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend=backend)
    eager_opt, compiled_opt = _sam(eager), _sam(compiled)
    for _ in range(4):
        want = train_step(eager, x, y, eager_opt, F.cross_entropy, micro_batch_size=micro_batch_size)
        got = train_step(compiled, x, y, compiled_opt, F.cross_entropy, micro_batch_size=micro_batch_size)
        for name in ("loss", "perturbed_loss", "grad_norm", "perturbation_norm"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
    # weights, momenta and BatchNorm statistics (updated by the clean passes only) after four steps
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(compiled_opt.base_optimizer.state[b]["momentum_buffer"],
                                   eager_opt.base_optimizer.state[a]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-5)


def test_sam_passes_and_train_eval_switches_compile_each_graph_once() -> None:
    model, (x, y) = _bn_net(), _batch()
    counter = GraphCounter()
    model.compile(backend=counter)
    optimizer = _sam(model)
    seen = []
    for _ in range(3):  # a SAM step (clean + perturbed pass), then an evaluation, three times
        model.train()
        train_step(model, x, y, optimizer, F.cross_entropy)
        model.eval()
        with torch.no_grad():
            model(x)
        seen.append(counter.graphs)
    assert seen == [2, 2, 2]  # one training graph for both SAM passes, one eval graph; none after the first round


def _tiny_run(*overrides: str, device: str = "cpu"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    spec = make_spec(cfg)
    return cfg, spec.settings, build_data(spec, torch.device(device))


def test_batch_sizes_of_one_pass() -> None:
    assert batch_sizes(100, 32) == [32, 4] and batch_sizes(96, 32) == [32] and batch_sizes(10, 32) == [10]


# A SAM step with m-sharpness chunks of 24; ESAM's with its selection forward and its pass on ⌈γ·n⌉ rows.
STEPS = {"sam": (["optimizer=sam", "optimizer.sam.micro_batch_size=24"], _sam, 24),
         "esam": (["optimizer=esam", "optimizer.sam.beta=1.0"],
                  lambda m: ESAM(m.parameters(), torch.optim.SGD, rho=0.1, beta=1.0, gamma=0.5, lr=0.1), None)}


@pytest.mark.parametrize(("step", "accumulate"), [("sam", 1), ("sam", 3), ("esam", 3)])  # 3: micro-batches of
@pytest.mark.parametrize("device", ["cpu", ON_CUDA])  # 22 + 21 + 21, also cut at the chunks of 24
def test_warm_up_compiles_every_graph_before_the_first_step_and_changes_nothing(device: str, step: str,
                                                                               accumulate: int) -> None:
    """CPU: graphs counted, run as captured. CUDA: through Inductor, in bf16 autocast as sam-run trains there."""
    # 250 training samples in batches of 64 (a partial last batch), a validation split, and eval batches of 100
    # over 225 training, 25 validation and 128 test samples: many batch sizes.
    overrides, make_optimizer, micro_batch_size = STEPS[step]
    cfg, settings, data = _tiny_run(*overrides, "dataset.source.num_train=250", "dataset.val_fraction=0.1",
                                    "eval.batch_size=100", device=device)
    model = _bn_net()
    model[0], model[-1] = nn.Conv1d(1, 6, 3, padding=1), nn.Linear(6 * 40, data.num_classes)  # the data's shapes
    model.to(device)
    autocast_dtype = torch.bfloat16 if device == "cuda" else None
    before, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    counter, clock = GraphCounter(inductor=device == "cuda"), Stopwatch()

    compile_model(model, data, autocast_dtype, cfg.optimizer.sam, clock, backend=counter, accumulate=accumulate)

    assert clock.times()["compile_time_s"] > 0 and counter.graphs > 0
    for name, value in model.state_dict().items():  # weights and BatchNorm statistics untouched
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random streams are the run's own
    compiled = counter.graphs
    optimizer = make_optimizer(model)
    for inputs, targets in data.train.epoch(0):  # a whole epoch and every evaluation of the run: nothing new
        train_step(model, inputs, targets, optimizer, F.cross_entropy, micro_batch_size=micro_batch_size,
                   autocast_dtype=autocast_dtype, accumulate=accumulate)
    for stream in (data.train_eval, data.val, data.test):
        evaluate(model, stream, autocast_dtype)
    assert counter.graphs == compiled


def test_a_failing_compiler_is_one_line_naming_the_way_out() -> None:
    def broken(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        raise RuntimeError("no working C++ compiler found\nmore detail")

    cfg, _, data = _tiny_run()
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, data.num_classes))
    with pytest.raises(ConfigError) as caught:
        compile_model(model, data, None, cfg.optimizer.sam, Stopwatch(), backend=broken)
    assert str(caught.value) == ("compile=true: the torch.compile backend failed (RuntimeError: no working C++ "
                                 "compiler found); set compile=false")


def test_sharpness_of_a_compiled_model_equals_the_eager_one() -> None:
    """Hessian-vector products need double backward, which AOTAutograd's compiled graphs do not support."""
    eager, (x, y) = _bn_net(), _batch()
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    compiled.eval()
    with torch.no_grad():
        compiled(x)  # compiled now: the measures must still work
    measure = partial(sharpness.measure, criterion=nn.CrossEntropyLoss(), batches=[(x, y)], rho=0.05,
                      measures=["lambda_max", "ascent"], seed=0)
    want, got = measure(eager), measure(compiled)
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_compiled_cuda_run_completes_and_records_its_compile_time(workdir: Path, optimizer: str) -> None:
    result = run_cli("sam-run", *TINY, "device=cuda", "compile=true", f"optimizer={optimizer}",
                     "hydra.run.dir=outputs/compiled", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = read_json(workdir / "outputs" / "compiled" / "summary.json")
    assert summary["status"] == "completed" and summary["compile_time_s"] > 0
    assert summary["train_acc"] > 0.5  # the synthetic classes are easy: a broken compiled step would not learn
