"""Standard torchvision transforms for the real-image datasets (torchvision is imported inside each function,
so that importing ``data`` stays cheap)."""

from __future__ import annotations

from typing import Any

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def imagenet_transforms(image_size: int, augment: bool) -> tuple[Any, Any]:
    """The classic ResNet recipe: random-resized crop + flip for training, resize + center crop for eval."""
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    val = T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), *normalize])
    if not augment:
        return val, val
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *normalize])
    return train, val


def cifar_transforms(image_size: int, augment: bool) -> tuple[Any, Any]:
    """Pad-and-crop + flip for training, as in the CIFAR ResNet papers."""
    from torchvision import transforms as T

    resize = [T.Resize(image_size)] if image_size != 32 else []
    normalize = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    val = T.Compose([*resize, *normalize])
    if not augment:
        return val, val
    train = T.Compose([*resize, T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(), *normalize])
    return train, val
