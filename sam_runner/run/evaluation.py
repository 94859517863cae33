"""Eval-mode passes: loss and accuracy without augmentation or label smoothing, and the generalization gaps.

Used by the loop after training epochs and by the pictures of flatness (report/landscape.py), which evaluate a
saved network at other weights through the same code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sam_runner.run.build import Data
from sam_runner.scale import distributed


def generalization(model: nn.Module, data: Data, autocast_dtype: torch.dtype | None,
                   world: distributed.World = distributed.World()) -> dict[str, float]:
    """Eval-mode loss and accuracy on the training set (or its fixed subset), the validation split when there is
    one, and the test set; and the generalization gaps (train vs test). Sharded over the processes of `world`."""
    train_loss, train_acc = evaluate(model, data.train_eval, autocast_dtype, world)
    test_loss, test_acc = evaluate(model, data.test, autocast_dtype, world)
    result = {"train_acc": train_acc, "test_acc": test_acc, "train_loss": train_loss, "test_loss": test_loss,
              "gap_acc": train_acc - test_acc, "gap_loss": test_loss - train_loss}
    if data.val is not None:
        result["val_loss"], result["val_acc"] = evaluate(model, data.val, autocast_dtype, world)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, stream: Any, autocast_dtype: torch.dtype | None,
             world: distributed.World = distributed.World()) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy in eval mode, without augmentation; each process of
    `world` takes its share of every batch, and all get the same totals."""
    model.eval()
    device = stream.targets.device
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    for inputs, targets in distributed.RankShare(stream, world).epoch(0):  # a rank may get no share of a batch
        with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)
        loss_sum = loss_sum + F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = correct + (logits.argmax(dim=1) == targets).sum()
    totals = distributed.all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]), world)
    return float(totals[0]) / stream.num_samples, float(totals[1]) / stream.num_samples
