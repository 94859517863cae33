"""scripts/bench.py: its FLOP count against closed forms, and one tiny run end to end (it reaches into run/,
so a change of the run's internals shows here first). Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_of_a_conv_and_linear_model_match_the_closed_form(bench) -> None:
    n, c_in, c_out, k, length, classes = 5, 2, 3, 3, 10, 4
    out_length = length - k + 1
    model = nn.Sequential(nn.Conv1d(c_in, c_out, k), nn.ReLU(), nn.Flatten(), nn.Linear(c_out * out_length, classes))
    conv = 2 * n * c_out * out_length * c_in * k  # 2 FLOPs per multiply-add
    linear = 2 * n * c_out * out_length * classes
    flops = bench.training_flops(model, torch.randn(n, c_in, length), torch.randint(0, classes, (n,)))
    assert flops["forward"] == conv + linear
    # backward: both weight gradients, and the linear layer's input gradient; not the data's (it needs none)
    assert flops["forward_backward"] == (conv + linear) + (conv + linear) + linear


def test_counting_leaves_the_model_where_it_was(bench) -> None:
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    bench.training_flops(model, torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert model.weight.device.type == "cpu" and torch.equal(model.weight, before) and model.weight.grad is None


def test_a_tiny_benchmark_writes_its_tables_and_json(bench, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    bench.main(["--model", "mlp", "--batch-size", "64", "--steps", "2", "--rounds", "2", "--device", "cpu",
                "--optimizers", "sam,usam", "--json", str(out), "dataset=synthetic", "dataset.source.num_train=200",
                "model.hidden=[16]"])
    result = json.loads(out.read_text())
    assert result["train_samples"] == 200 and list(result["optimizers"]) == ["sgd", "sam", "usam"]
    # the MLP 40 -> 16 -> 10: forward 2(40*16 + 16*10) per image; a step adds both weight gradients and the
    # second layer's input gradient; SAM takes two forward-backward passes
    forward, step = 2 * (40 * 16 + 16 * 10), 2 * (40 * 16 + 16 * 10) * 2 + 2 * 16 * 10
    assert result["flops_per_image"] == {"forward": forward, "sgd_step": step, "sam_step": 2 * step}
    for name, row in result["optimizers"].items():
        assert all(row[key] > 0 for key in ("runner_step", "runner_epoch", "eval", "checkpoint", "over_sgd_step"))
        assert (row["bare_step"] is None) == (name == "usam")  # a variant has no bare loop to compare with
        assert row["runner_epoch_peak_fraction"] is None  # no known peak on a CPU
        assert (row["forward_passes"], row["backward_passes"]) == ((1, 1) if name == "sgd" else (2, 2))
    assert result["optimizers"]["sgd"]["over_sgd_step"] == 1
    printed = capsys.readouterr().out
    assert "| SGD |" in printed and "| SAM |" in printed and "SAM/SGD time: step" in printed
    assert "| usam | 2 | 2 |" in printed and "| USAM |" not in printed


def test_passes_are_counted_in_batches_and_a_no_grad_forward_has_no_backward(bench) -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(8, 3)

    def train(steps: int) -> None:  # per step: a whole batch forward and back, then half of it without gradients
        for _ in range(steps):
            model(x).sum().backward()
            with torch.no_grad():
                model(x[:4])

    assert bench.count_passes(model, train, steps=3, batch_size=8) == {"forward": 1.5, "backward": 1.0}
