"""Classification: integer labels, cross-entropy, top-1 and top-5 accuracy from sums reduced across ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.comm import all_reduce_sum
from tasks.registry import OutputLossTask, main_output, register_task

if TYPE_CHECKING:
    from engine.config import Config


@register_task("classification")
class ClassificationTask(OutputLossTask):
    """Integer labels; cross-entropy; top-1 and top-5 accuracy (percent; top-5 only with more than 5 classes, where
    it says something: ``num_classes`` 0 = not known)."""

    metrics = ("val_acc1", "val_acc5")

    def __init__(self, label_smoothing: float = 0.0, num_classes: int = 0) -> None:
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    @classmethod
    def from_config(cls, cfg: Config, ground_truth: dict[str, Any] | None = None) -> ClassificationTask:
        return cls(cfg.train.label_smoothing, cfg.model.num_classes)

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(output, targets, label_smoothing=self.label_smoothing)

    def scorer(self, device: torch.device) -> ClassificationScorer:
        return ClassificationScorer(device, top5=self.num_classes == 0 or self.num_classes > 5)

    def predict(self, logits: Tensor, class_names: list[str], top_k: int) -> list[tuple[str, dict[str, Any]]]:
        """The ``top_k`` most probable classes (softmax), at most all but one."""
        top = logits.float().softmax(1).topk(max(1, min(top_k, len(class_names) - 1)), dim=1)
        results = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            classes = [class_names[i] for i in indices]
            line = ", ".join(f"{c} {100 * p:.1f}%" for c, p in zip(classes, values))
            results.append((line, {"classes": classes, "indices": indices, "probabilities": values}))
        return results


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
