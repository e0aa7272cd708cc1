"""Classification: integer labels (MixUp/CutMix: soft targets), cross-entropy, top-1 and top-5 accuracy from sums
reduced across ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.comm import all_reduce_sum
from tasks.registry import OutputLossTask, main_output, register_task

if TYPE_CHECKING:
    from engine.config import Config


@register_task("classification")
class ClassificationTask(OutputLossTask):
    """Integer labels; cross-entropy; top-1 and top-5 accuracy (percent; top-5 only with more than 5 classes, where
    it says something: ``num_classes`` 0 = not known). ``mix`` (``train.mixup_alpha``, ``train.cutmix_alpha``):
    each training batch mixed on the device, its labels becoming the mixed one-hot vectors."""

    metrics = ("val_acc1", "val_acc5")
    config_keys = ("data.mean", "data.std", "data.crop_scale", "data.crop_ratio", "data.train_crop_size",
                   "data.val_resize_size", "data.val_crop_size", "data.interpolation", "data.auto_augment",
                   "data.auto_augment_kwargs", "data.random_erase", "train.label_smoothing", "train.mixup_alpha",
                   "train.cutmix_alpha")

    def __init__(self, label_smoothing: float = 0.0, num_classes: int = 0,
                 mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None) -> None:  # fmt: skip
        self.label_smoothing, self.num_classes, self.mix = label_smoothing, num_classes, mix

    @classmethod
    def from_config(cls, cfg: Config, ground_truth: dict[str, Any] | None = None) -> ClassificationTask:
        mix = batch_mix(cfg.model.num_classes, cfg.train.mixup_alpha, cfg.train.cutmix_alpha)
        return cls(cfg.train.label_smoothing, cfg.model.num_classes, mix)

    def training_loss(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        if self.mix is not None:  # MixUp/CutMix: images mixed in pairs, targets the same mixture of one-hot labels
            images, targets = self.mix(images, targets)
        return self.loss(model(images), targets)

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy against integer labels or, mixed, against class probabilities (N, classes)."""
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


def batch_mix(num_classes: int, mixup_alpha: float, cutmix_alpha: float
              ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:  # fmt: skip
    """torchvision v2's MixUp and CutMix on a batch (one of the two, at random, where both are on), as its
    reference's collate does; here on the device, after normalisation, so uint8 batches travel as they are. Each
    pairs a batch with itself rolled by one. The draws come from torch's CPU generator, which checkpoints keep per
    rank: a resumed run mixes the same pairs with the same weights and boxes. None: both off."""
    from torchvision.transforms import v2

    mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
    mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []
    return v2.RandomChoice(mixes) if len(mixes) == 2 else (mixes[0] if mixes else None)


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
