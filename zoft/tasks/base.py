"""The task interface the engine and the training loop consume.

A task turns raw examples (dicts read from JSONL/CSV/HF datasets) into model inputs and
turns the model's outputs back into one loss per *probe*. The engine runs P probes at once
by concatenating P copies of a batch along dimension 0 (probe-major: rows
[0, R) are probe 0, [R, 2R) probe 1, ... where R is the batch's row count), so
``Task.loss`` receives outputs for P*R rows and must return a tensor of shape (P,).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Batch:
    """One training/eval batch.

    inputs:  keyword arguments of the model's ``forward`` (tensors with R rows on dim 0;
             the engine concatenates P copies of each).
    targets: whatever ``Task.loss`` needs (tensors with R rows on dim 0, repeated like inputs;
             or non-tensor metadata, passed through unchanged).
    size:    number of *examples* in the batch (R may be larger, e.g. one row per candidate).
    """

    inputs: dict[str, torch.Tensor]
    targets: dict[str, Any] = field(default_factory=dict)
    size: int = 0

    def to(self, device: torch.device | str) -> "Batch":
        def mv(v):
            return v.to(device) if isinstance(v, torch.Tensor) else v

        return Batch({k: mv(v) for k, v in self.inputs.items()},
                     {k: mv(v) for k, v in self.targets.items()}, self.size)

    def repeat(self, num_probes: int) -> "Batch":
        """P probe-major copies of every tensor along dim 0 (non-tensors pass through)."""
        if num_probes == 1:
            return self

        def rep(v):
            return torch.cat([v] * num_probes, dim=0) if isinstance(v, torch.Tensor) else v

        return Batch({k: rep(v) for k, v in self.inputs.items()},
                     {k: rep(v) for k, v in self.targets.items()}, self.size)


class Task(Protocol):
    """What ``zoft.train`` and the engine need from a task."""

    name: str

    def validate(self, examples: list[dict]) -> None:
        """Raise ``zoft.errors.UsageError`` naming the first example (file and line when the
        examples come from ``zoft.tasks.data.load_examples``) that this task cannot use."""
        ...

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        """Run ``model`` on ``batch.inputs`` the way this task needs (causal LMs get
        ``use_cache=False``); callers never pass model-specific keywords themselves. The built-in
        tasks have a ``head_chunk`` attribute: when set, this returns the final hidden state and
        the head (``zoft.tasks.head.HiddenOutputs``) and ``loss`` runs the head in chunks."""
        ...

    def collate(self, examples: list[dict]) -> Batch:
        """Tokenize raw examples (dicts) into one ``Batch`` (R rows, R >= len(examples))."""
        ...

    def loss(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        """Per-probe loss, shape (P,), from the model outputs on ``batch.repeat(P)``.

        ``batch`` may be the plain batch or ``batch.repeat(P)``; both give the same result.
        The loss of probe p must depend only on rows [p*R, (p+1)*R) and equal the loss the
        same examples get in a plain forward pass with ``num_probes=1``.
        """
        ...

    def evaluate(self, model: torch.nn.Module, examples: list[dict], batch_size: int) -> dict[str, float]:
        """Held-out metrics (e.g. ``{"accuracy": 0.81, "loss": 0.45}``) with the plain model."""
        ...
