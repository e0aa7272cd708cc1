"""Exact distributed evaluation, and the run's evaluation of its model (and EMA) with settled BatchNorm statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from engine.bn import RunningStatistics
from engine.config import TrainConfig
from engine.ema import ModelEma
from engine.inputs import InputPrep
from engine.runtime.watchdog import enter, progress
from engine.trainer import autocast

if TYPE_CHECKING:
    from tasks.registry import Task  # the interface only: engine/ imports no task


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, inputs: InputPrep, cfg: TrainConfig) -> dict[str, Any]:
    """The task's scores over the whole validation set (classification: loss, top-1, top-5; segmentation: loss,
    mIoU, pixel accuracy, per-class IoU; detection: COCO mAP), from sums and counts reduced across ranks or, for
    detection, every rank's predictions gathered and scored once.

    ``model`` must be the unwrapped module: ranks may hold different numbers of batches,
    so nothing inside the loop may communicate; the only collectives are the scorer's, at the end.
    """
    model.eval()
    enter("evaluating", in_collective=False)
    scorer = task.scorer(inputs.device)
    for images, targets in loader:
        progress()
        images, targets = inputs(images), inputs.targets(targets)
        with autocast(inputs.device, cfg.amp):
            output = model(images)
        scorer.update(output, targets)
    enter("in the evaluation's final sum", in_collective=True)
    metrics = scorer.result()
    progress()
    return metrics


@dataclass(frozen=True)
class RunEvaluation:
    """The run's evaluation at a step: BatchNorm statistics settled (PreciseBN, or made to agree across ranks),
    then the model scored exactly on the validation split, and the EMA scored like it (keys ``val_*_ema``)."""

    loader: DataLoader  # the validation split, each sample on one rank
    task: Task
    inputs: InputPrep
    cfg: TrainConfig
    bn_stats: RunningStatistics
    model: nn.Module  # unwrapped
    ema: ModelEma | None = None

    def __call__(self, step: int) -> dict[str, Any]:
        enter("settling BatchNorm statistics (PreciseBN or the ranks' agreement)", in_collective=True)
        self.bn_stats.before_evaluation(step)
        progress()
        metrics = evaluate(self.model, self.loader, self.task, self.inputs, self.cfg)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.loader, self.task, self.inputs, self.cfg)
            metrics |= {f"{key}_ema": value for key, value in ema.items()}
        return metrics
