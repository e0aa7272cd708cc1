"""What every task shares: the Task interface, the ignore index of masks, and the logits a model's output holds."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

IGNORE_INDEX = 255  # mask value of pixels that count for nothing (VOC's object borders, crop padding)


def main_output(output: Tensor | dict[str, Tensor]) -> Tensor:
    """The logits a model's output holds: torchvision's segmentation models return ``{"out": ..., "aux": ...}``."""
    return output["out"] if isinstance(output, dict) else output


class Task(abc.ABC):
    """What a task decides: the training loss of a batch, and a scorer of validation batches (``update(outputs,
    targets)`` per batch, then ``result()``, a collective, once)."""

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, images: Any, targets: Any) -> Tensor:
        """The mean loss of a training batch; the task runs the forward (a detector takes the targets too)."""

    @abc.abstractmethod
    def scorer(self, device: torch.device) -> Any:
        """A fresh scorer for one evaluation."""


class OutputLossTask(Task):
    """A task whose loss is a function of the model's output and the targets (classification, segmentation)."""

    @abc.abstractmethod
    def loss(self, output: Any, targets: Any) -> Tensor:
        """The mean loss of ``output`` against ``targets``."""

    def training_loss(self, model: nn.Module, images: Any, targets: Any) -> Tensor:
        return self.loss(model(images), targets)
