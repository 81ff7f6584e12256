"""Classification of plain tensors: the objective for a torch classifier (a CNN, an MLP) on
``Batch({"x": x}, {"y": y})``, for the engine (``forward`` + ``loss``) and first-order steps
(``fo_loss``)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from zoft.tasks.base import Batch


def tensor_batch(x: torch.Tensor, y: torch.Tensor) -> Batch:
    """x: (R, ...) inputs, y: (R,) int64 class ids."""
    return Batch({"x": x}, {"y": y}, size=int(y.shape[0]))


class TensorClassify:
    """Mean cross-entropy of ``model(x)`` ((N, C) logits) against ``y``, per probe."""

    name = "tensor-classify"

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        return model(batch.inputs["x"])

    def loss(self, outputs: torch.Tensor, batch: Batch, num_probes: int) -> torch.Tensor:
        per_row = F.cross_entropy(outputs, batch.targets["y"], reduction="none")  # (P*R,)
        return per_row.view(num_probes, -1).mean(dim=1)

    def fo_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch.inputs["x"]), batch.targets["y"])

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module, batch: Batch) -> float:
        return (model(batch.inputs["x"]).argmax(dim=1) == batch.targets["y"]).double().mean().item()
