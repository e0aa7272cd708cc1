"""What the task decides (``task:`` in the config): the training loss of a batch, and how validation is scored.

Everything else (launch, SyncBN, DDP, samplers, checkpoints, resume) is shared by both tasks. Scores are exact
whatever the world size: every rank accumulates sums and counts over its share of the validation set (each sample
on exactly one rank), and one collective adds them up. Segmentation scores come from a confusion matrix summed in
int64, so pixel accuracy and IoU are the same at any world size, to the last bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import Config
from engine.distributed import all_reduce_sum

IGNORE_INDEX = 255  # mask value of pixels that count for nothing (VOC's object borders, crop padding)


def main_output(output: Tensor | dict[str, Tensor]) -> Tensor:
    """The logits a model's output holds: torchvision's segmentation models return ``{"out": ..., "aux": ...}``."""
    return output["out"] if isinstance(output, dict) else output


class ClassificationTask:
    """Integer labels; cross-entropy; top-1 and top-5 accuracy (percent; top-5 only with more than 5 classes, where
    it says something: ``num_classes`` 0 = not known)."""

    def __init__(self, label_smoothing: float = 0.0, num_classes: int = 0) -> None:
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(output, targets, label_smoothing=self.label_smoothing)

    def scorer(self, device: torch.device) -> ClassificationScorer:
        return ClassificationScorer(device, top5=self.num_classes == 0 or self.num_classes > 5)


class ClassificationScorer:
    def __init__(self, device: torch.device, top5: bool = True) -> None:
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
        self.top5 = top5

    def update(self, output: Tensor, targets: Tensor) -> None:
        logits = main_output(output)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        self.totals += torch.stack(
            [loss.double(), hits[:, 0].sum().double(), hits.any(1).sum().double(), self.totals.new_tensor(len(targets))]
        )

    def result(self) -> dict[str, float]:
        """Collective: every rank calls it once, after its last batch."""
        loss_sum, top1, top5, count = all_reduce_sum(self.totals).tolist()
        count = max(count, 1)
        scores = {"val_loss": loss_sum / count, "val_acc1": 100 * top1 / count}
        return scores | {"val_acc5": 100 * top5 / count} if self.top5 else scores


class SegmentationTask:
    """Integer masks (N, H, W) with ``IGNORE_INDEX`` for pixels that do not count; per-pixel cross-entropy (plus
    ``aux_weight`` x the auxiliary head's, when the model has one); pixel accuracy and IoU (percent)."""

    def __init__(self, num_classes: int, aux_weight: float = 0.0, label_smoothing: float = 0.0) -> None:
        self.num_classes, self.aux_weight, self.label_smoothing = num_classes, aux_weight, label_smoothing

    def loss(self, output: Tensor | dict[str, Tensor], targets: Tensor) -> Tensor:
        loss = self._pixel_loss(main_output(output), targets)
        if isinstance(output, dict) and "aux" in output and self.aux_weight > 0:
            loss = loss + self.aux_weight * self._pixel_loss(output["aux"], targets)
        return loss

    def _pixel_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean over the batch's labelled pixels; a batch with none gives 0, not 0/0 (no host read decides it)."""
        total = F.cross_entropy(
            to_mask_size(logits, targets),
            targets,
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def scorer(self, device: torch.device) -> SegmentationScorer:
        return SegmentationScorer(self.num_classes, device)


def to_mask_size(logits: Tensor, targets: Tensor) -> Tensor:
    """Logits upsampled (bilinear) to the mask's size when the model predicts at a lower resolution."""
    if logits.shape[-2:] == targets.shape[-2:]:
        return logits
    return F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)


class SegmentationScorer:
    """A confusion matrix (rows: truth, columns: prediction) over the labelled pixels, plus the loss sum."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, labelled pixels

    def update(self, output: Tensor | dict[str, Tensor], targets: Tensor) -> None:
        logits = to_mask_size(main_output(output), targets).float()
        labelled = targets != IGNORE_INDEX
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        self.loss += torch.stack([loss.double(), labelled.sum().double()])
        cells = targets[labelled] * self.num_classes + logits.argmax(1)[labelled]
        self.confusion += torch.bincount(cells, minlength=self.num_classes**2)

    def result(self) -> dict[str, Any]:
        """Collective: every rank calls it once, after its last batch. ``val_iou`` holds each class's IoU (None for
        a class neither in the truth nor in the predictions); ``val_miou`` is their mean over the others."""
        confusion = all_reduce_sum(self.confusion).view(self.num_classes, self.num_classes).double()
        loss_sum, pixels = all_reduce_sum(self.loss).tolist()
        hits = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - hits
        iou = [100 * h / u if u > 0 else None for h, u in zip(hits.tolist(), union.tolist())]
        present = [v for v in iou if v is not None]
        return {
            "val_loss": loss_sum / max(pixels, 1),
            "val_miou": sum(present) / max(len(present), 1),
            "val_pixel_acc": 100 * hits.sum().item() / max(confusion.sum().item(), 1),
            "val_iou": iou,
        }


Task = ClassificationTask | SegmentationTask


def build_task(cfg: Config) -> Task:
    """The task named by ``cfg.task``, with what its loss and scores need from the config."""
    if cfg.task == "segmentation":
        return SegmentationTask(cfg.model.num_classes, cfg.model.aux_loss_weight, cfg.train.label_smoothing)
    return ClassificationTask(cfg.train.label_smoothing, cfg.model.num_classes)
