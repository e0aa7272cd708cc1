"""``small_detector``: a Faster R-CNN small enough for a CPU, with BatchNorm in its backbone and in its box head, where
SyncBN meets detection's inputs (the box head normalises the proposals sampled from every image of the batch)."""

from __future__ import annotations

from torch import Tensor, nn

from models.registry import register_model


class SmallBackbone(nn.Module):
    """Six 3x3 convolutions with BatchNorm, stride 8 overall: one feature map of ``4 x width`` channels."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        layers, cin = [], 3
        for cout, stride in ((w, 2), (w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_channels = 4 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@register_model("small_detector", task="detection")
def small_detector(num_classes: int, width: int = 16, min_size: int | list[int] = 128, max_size: int = 192,
                   **kwargs) -> nn.Module:  # fmt: skip
    """A Faster R-CNN (torchvision's) on :class:`SmallBackbone`: anchors of 16-64 pixels at stride 8, a box head of
    two conv-BatchNorm layers over 7x7 RoI features (its BatchNorm normalises the sampled proposals of the batch),
    and fewer proposals than torchvision's defaults, for images of about 128 pixels on a CPU. ``kwargs``: any of
    ``FasterRCNN``'s keyword arguments."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    backbone = SmallBackbone(width)
    channels = backbone.out_channels
    settings = {"rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 150, "rpn_pre_nms_top_n_test": 150,
                "rpn_post_nms_top_n_test": 100, "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 64,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]} | kwargs  # fmt: skip
    return FasterRCNN(
        backbone,
        min_size=min_size,  # a list: each training image at one of these short sides (scale jitter)
        max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(sizes=((16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels, channels], [2 * channels], norm_layer=nn.BatchNorm2d),
        box_predictor=FastRCNNPredictor(2 * channels, num_classes),
        **settings,
    )
