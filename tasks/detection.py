"""Detection: images of any size with a dict of boxes and labels each, a model that returns its own losses in training
and its boxes at evaluation, and COCO mAP counted once per validation image whatever the world size.

Each validation image is predicted on exactly one rank (the evaluation sampler shards without padding); the ranks'
predictions are gathered and rank 0 scores them all with pycocotools against the split's ground truth, as a single
process would: the same detections, the same ground truth, hence the same numbers at any world size.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from engine.comm import gather_objects, rank0_decides
from tasks.registry import Task, register_task

if TYPE_CHECKING:
    from engine.config import Config

Target = dict[str, Any]  # "boxes" (n, 4) float x1 y1 x2 y2 in pixels, "labels" (n,) int64, "image_id" int


@register_task("detection")
class DetectionTask(Task):
    """The sum of the model's loss dict (torchvision's detectors: classifier, box regression, objectness, RPN box
    regression); COCO box mAP at IoU 0.5:0.95, 0.5 and 0.75 (percent). ``ground_truth``: the validation split as a
    COCO instances dict (``images``, ``annotations``, ``categories``)."""

    metrics = ("val_map", "val_map50", "val_map75")
    model_family = "detection"
    dense = True
    config_keys = ("model.unfreeze_bn", "data.aspect_ratio_group_factor")

    def __init__(self, ground_truth: dict[str, Any]) -> None:
        self.ground_truth = ground_truth

    @classmethod
    def from_config(cls, cfg: Config, ground_truth: dict[str, Any] | None = None) -> DetectionTask:
        return cls(ground_truth)

    def training_loss(self, model: nn.Module, images: list[Tensor], targets: list[Target]) -> Tensor:
        return sum(model(images, targets).values())

    def scorer(self, device: torch.device) -> DetectionScorer:
        return DetectionScorer(self.ground_truth)


class DetectionScorer:
    """Keeps this rank's detections, in COCO's result format, for one gathered evaluation."""

    def __init__(self, ground_truth: dict[str, Any]) -> None:
        self.ground_truth = ground_truth
        self.detections: list[tuple[int, list[list[float]], list[float], list[int]]] = []

    def update(self, outputs: list[dict[str, Tensor]], targets: list[Target]) -> None:
        for output, target in zip(outputs, targets):
            boxes = output["boxes"].float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)  # COCO's boxes: corner, width, height
            self.detections.append((int(target["image_id"]), xywh.tolist(), output["scores"].float().cpu().tolist(),
                                    output["labels"].cpu().tolist()))  # fmt: skip

    def result(self) -> dict[str, float]:
        """Collective: every rank calls it once, after its last batch. Rank 0 scores every rank's detections."""
        gathered = [item for part in gather_objects(self.detections) for item in part]
        return rank0_decides(lambda: coco_map(self.ground_truth, gathered))


def coco_map(ground_truth: dict[str, Any], detections: list[tuple[int, list, list, list]]) -> dict[str, float]:
    """pycocotools' box mAP (percent) of ``detections`` (image id, boxes xywh, scores, labels per image) against
    ``ground_truth``. No detections at all score 0 (pycocotools cannot load an empty result list)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = [{"image_id": image_id, "category_id": label, "bbox": box, "score": score}
               for image_id, boxes, scores, labels in sorted(detections, key=lambda item: item[0])
               for box, score, label in zip(boxes, scores, labels)]  # fmt: skip
    if not results:
        return {"val_map": 0.0, "val_map50": 0.0, "val_map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every stage
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # -1 is pycocotools' "no ground truth box to score against": nothing found of nothing, reported as 0
    ap, ap50, ap75 = (100 * max(float(v), 0.0) for v in evaluation.stats[:3])
    return {"val_map": ap, "val_map50": ap50, "val_map75": ap75}
