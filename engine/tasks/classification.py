"""Classification: integer labels, cross-entropy, top-1 and top-5 accuracy from sums reduced across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.distributed import all_reduce_sum
from engine.tasks.common import OutputLossTask, main_output


class ClassificationTask(OutputLossTask):
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
