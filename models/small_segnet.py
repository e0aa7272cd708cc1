"""A small encoder-decoder segmentation net with BatchNorm after every convolution: the segmentation default,
quick on a CPU. Three scales (1, 1/2, 1/4, the last dilated for context), a decoder with skip connections, and
logits at the input's size."""

from __future__ import annotations

import torch
from torch import nn

from engine.grad_checkpointing import checkpoint_stages
from models.registry import register_model


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallSegNet(nn.Module):
    def __init__(self, num_classes: int = 7, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_conv_bn(in_channels, w), _conv_bn(w, w))
        self.enc2 = nn.Sequential(_conv_bn(w, 2 * w, stride=2), _conv_bn(2 * w, 2 * w))
        self.enc3 = nn.Sequential(
            _conv_bn(2 * w, 4 * w, stride=2), _conv_bn(4 * w, 4 * w, dilation=2), _conv_bn(4 * w, 4 * w, dilation=4)
        )
        self.dec2 = _conv_bn(4 * w + 2 * w, 2 * w)
        self.dec1 = _conv_bn(2 * w + w, w)
        self.classifier = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.enc1(x)
        f2 = self.enc2(f1)
        f3 = self.enc3(f2)
        d2 = self.dec2(torch.cat([nn.functional.interpolate(f3, size=f2.shape[-2:], mode="bilinear"), f2], 1))
        d1 = self.dec1(torch.cat([nn.functional.interpolate(d2, size=f1.shape[-2:], mode="bilinear"), f1], 1))
        return self.classifier(d1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``train.grad_checkpointing``: each encoder block recomputed in backward (timm's switch, by name)."""
        checkpoint_stages(self.enc1, self.enc2, self.enc3, enable=enable)


@register_model("small_segnet", task="segmentation")
def small_segnet(num_classes: int, **kwargs) -> nn.Module:
    return SmallSegNet(num_classes=num_classes, **kwargs)
