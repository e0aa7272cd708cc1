"""A small VGG-style CNN with BatchNorm: the default model, quick on a CPU."""

from __future__ import annotations

from torch import nn

from engine.grad_checkpointing import checkpoint_stages
from models.registry import register_model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(in_channels, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * width, 4 * width, bias=False), nn.BatchNorm1d(4 * width),
                                nn.ReLU(inplace=True), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``train.grad_checkpointing``: each feature block recomputed in backward (timm's switch, by name)."""
        checkpoint_stages(self.features, enable=enable)


@register_model("small_cnn")
def small_cnn(num_classes: int, **kwargs) -> nn.Module:
    return SmallCNN(num_classes=num_classes, **kwargs)
