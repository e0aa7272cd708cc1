"""The CIFAR ResNets of He et al. (2016), section 4.2: 3x3 stem, three stages, 6n+2 layers."""

from __future__ import annotations

from torch import nn

from engine.grad_checkpointing import checkpoint_stages
from models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``train.grad_checkpointing``: each residual block recomputed in backward (timm's switch, by name)."""
        checkpoint_stages(self.layers, enable=enable)


@register_model("cifar_resnet20")
def cifar_resnet20(num_classes: int, **kwargs) -> nn.Module:
    return CifarResNet(20, num_classes, **kwargs)


@register_model("cifar_resnet56")
def cifar_resnet56(num_classes: int, **kwargs) -> nn.Module:
    return CifarResNet(56, num_classes, **kwargs)


@register_model("resnet18_cifar")
def resnet18_cifar(num_classes: int, **kwargs) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs: 3x3 stride-1 stem, no max-pool (the common CIFAR variant)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes, **kwargs)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model
