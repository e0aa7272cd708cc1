"""What the task decides (``task:`` in the config): the training loss of a batch, and how validation is scored.

Everything else (launch, SyncBN, DDP, samplers, checkpoints, resume) is shared by every task. Scores are exact
whatever the world size: each validation sample is scored on exactly one rank, and one collective combines the
ranks' sums (classification, segmentation) or gathers their predictions (detection).
"""

from __future__ import annotations

from typing import Any

from engine.config import Config
from engine.errors import DataError
from engine.tasks.classification import ClassificationScorer, ClassificationTask
from engine.tasks.common import IGNORE_INDEX, Task, main_output
from engine.tasks.detection import DetectionScorer, DetectionTask
from engine.tasks.segmentation import SegmentationScorer, SegmentationTask, to_mask_size

__all__ = [
    "IGNORE_INDEX",
    "ClassificationScorer",
    "ClassificationTask",
    "DetectionScorer",
    "DetectionTask",
    "SegmentationScorer",
    "SegmentationTask",
    "Task",
    "build_task",
    "main_output",
    "to_mask_size",
]


def build_task(cfg: Config, ground_truth: dict[str, Any] | None = None) -> Task:
    """The task named by ``cfg.task``, with what its loss and scores need from the config (detection: the
    validation split's ground truth as a COCO instances dict, which the dataset provides)."""
    if cfg.task == "detection":
        if ground_truth is None:
            raise DataError(f"data.name: dataset '{cfg.data.name}' gives no COCO ground truth for detection "
                            "(a detection dataset's DatasetPair sets ground_truth)")
        return DetectionTask(ground_truth)
    if ground_truth is not None:
        raise DataError(f"data.name: '{cfg.data.name}' is a detection dataset but task is {cfg.task}; set task: detection")
    if cfg.task == "segmentation":
        return SegmentationTask(cfg.model.num_classes, cfg.model.aux_loss_weight, cfg.train.label_smoothing)
    return ClassificationTask(cfg.train.label_smoothing, cfg.model.num_classes)
