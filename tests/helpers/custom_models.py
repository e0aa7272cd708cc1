"""A user's model with a BatchNorm subclass of their own (its own forward): what the converters must refuse by name."""

from torch import nn

from models import register_model


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm, then a fixed scale: a synchronised plain layer would silently drop the scale."""

    def forward(self, x):
        return 2 * super().forward(x)


@register_model("net_with_custom_bn")
def net_with_custom_bn(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
