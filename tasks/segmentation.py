"""Segmentation: integer masks with ignored pixels, per-pixel cross-entropy (plus an auxiliary head's), and IoU from an
int64 confusion matrix summed across ranks: the same scores at any world size, to the last bit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.comm import all_reduce_sum
from tasks.registry import OutputLossTask, main_output, register_task

if TYPE_CHECKING:
    from engine.config import Config

IGNORE_INDEX = 255  # mask value of pixels that count for nothing (VOC's object borders, crop padding)


@register_task("segmentation")
class SegmentationTask(OutputLossTask):
    """Integer masks (N, H, W) with ``IGNORE_INDEX`` for pixels that do not count; per-pixel cross-entropy (plus
    ``aux_weight`` x the auxiliary head's, when the model has one); pixel accuracy and IoU (percent)."""

    metrics = ("val_miou", "val_pixel_acc")
    model_family = "segmentation"
    dense = True
    config_keys = ("data.mean", "data.std", "data.base_size", "data.scale_range", "model.aux_loss_weight",
                   "train.label_smoothing")

    def __init__(self, num_classes: int, aux_weight: float = 0.0, label_smoothing: float = 0.0) -> None:
        self.num_classes, self.aux_weight, self.label_smoothing = num_classes, aux_weight, label_smoothing

    @classmethod
    def from_config(cls, cfg: Config, ground_truth: dict[str, Any] | None = None) -> SegmentationTask:
        return cls(cfg.model.num_classes, cfg.model.aux_loss_weight, cfg.train.label_smoothing)

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
