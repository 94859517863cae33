"""On a CUDA device: the runner end to end in bf16 (the default there) and fp16 with loss scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, read_json, run_cli


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["auto", "fp16"])
@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_cuda_run_completes_with_mixed_precision(workdir: Path, precision: str, optimizer: str) -> None:
    result = run_cli("sam-run", *TINY, "device=cuda", f"precision={precision}", f"optimizer={optimizer}",
                     "hydra.run.dir=outputs/gpu", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = read_json(workdir / "outputs" / "gpu" / "summary.json")
    assert summary["status"] == "completed" and summary["device"] == "cuda"
    assert summary["precision"] == ("bf16" if precision == "auto" else "fp16")
    assert summary["train_acc"] > 0.5  # the synthetic classes are easy: a broken AMP step would not learn


def test_cuda_request_without_a_gpu_is_a_clear_error(workdir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = run_cli("sam-run", *TINY, "device=cuda", "hydra.run.dir=outputs/nogpu", cwd=workdir)
    assert result.returncode == 2
    assert "device=cuda but no CUDA device is visible" in result.stderr
