"""What every task shares: the ignore index of masks, and the logits a model's output holds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

IGNORE_INDEX = 255  # mask value of pixels that count for nothing (VOC's object borders, crop padding)


def main_output(output: Tensor | dict[str, Tensor]) -> Tensor:
    """The logits a model's output holds: torchvision's segmentation models return ``{"out": ..., "aux": ...}``."""
    return output["out"] if isinstance(output, dict) else output


class Task:
    """What a task decides: the training loss of a batch and a scorer of validation batches. Subclasses give
    ``loss(output, targets)`` and ``scorer(device)``; a task whose model takes the targets too (detection)
    overrides :meth:`training_loss`."""

    def loss(self, output: Any, targets: Any) -> Tensor:
        raise NotImplementedError

    def scorer(self, device: torch.device) -> Any:
        raise NotImplementedError

    def training_loss(self, model: nn.Module, images: Any, targets: Any) -> Tensor:
        """The mean loss of a training batch, from the model's forward pass."""
        return self.loss(model(images), targets)
