"""torchvision's detectors by name, their backbone's frozen BatchNorm made trainable on request.

A detector takes a list of images (float, [0, 1], any sizes) and in training their targets too, and returns a dict
of losses in training and a list of ``{"boxes", "labels", "scores"}`` (in the images' own pixels) at evaluation.
It resizes and normalises images itself (``min_size``, ``max_size``, ``image_mean``, ``image_std``: torchvision's
keyword arguments, through ``model.kwargs``).
"""

from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.errors import ModelError

NEEDS_MORE_THAN_BOXES = ("maskrcnn", "keypointrcnn")  # their training needs instance masks or keypoints


def build_torchvision_detector(builder, cfg: ModelConfig) -> nn.Module:  # noqa: ANN001  (a torchvision builder)
    """torchvision's detector ``cfg.name`` with ``cfg.num_classes`` classes (the background included). With
    ``cfg.pretrained`` its backbone starts from ImageNet weights (the detection heads are new), and torchvision then
    freezes that backbone's BatchNorm (FrozenBatchNorm2d) unless ``cfg.unfreeze_bn``."""
    if cfg.name.startswith(NEEDS_MORE_THAN_BOXES):
        raise ModelError(f"model.name: {cfg.name} trains on instance masks or keypoints, which this template's "
                         "detection data does not give; pick a box detector (fasterrcnn_*, retinanet_*, fcos_*, ssd*)")
    kwargs = {"weights": None, "weights_backbone": "DEFAULT" if cfg.pretrained else None, **cfg.kwargs}
    try:
        model = builder(num_classes=cfg.num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # ValueError: torchvision's own checks (num_classes against weights, ...)
        raise ModelError(f"model.kwargs: {cfg.name} rejected its arguments: {exc}") from None
    return unfreeze_batchnorm(model) if cfg.unfreeze_bn else model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Every ``FrozenBatchNorm2d`` replaced by a ``BatchNorm2d`` holding the same statistics and affine values, so
    it normalises with batch statistics in training (and SyncBN has something to synchronise). Its weight and bias
    train where the convolution before it trains (torchvision freezes the first backbone stages' parameters)."""
    from torchvision.ops import FrozenBatchNorm2d

    for parent in list(model.modules()):
        trains = True
        for name, child in parent.named_children():
            if isinstance(child, FrozenBatchNorm2d):
                setattr(parent, name, _as_batchnorm(child, trains))
            elif any(True for _ in child.parameters()):
                trains = any(p.requires_grad for p in child.parameters())
    return model


def _as_batchnorm(frozen: nn.Module, trains: bool) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(frozen.weight.numel(), eps=frozen.eps, device=frozen.weight.device, dtype=frozen.weight.dtype)
    for key in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, key).data.copy_(getattr(frozen, key))
    bn.weight.requires_grad_(trains)
    bn.bias.requires_grad_(trains)
    return bn
