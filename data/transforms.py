"""Standard torchvision transforms for the real-image datasets (torchvision is imported inside each function,
so that importing ``data`` stays cheap), and the joint image + mask transform of segmentation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.tasks import IGNORE_INDEX

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


class SegmentationTransform:
    """Image and mask together, as torchvision's segmentation reference does: a random rescale of the short side
    (``base_size`` x a factor from ``scale_range``), a horizontal flip and a random crop padded where the image is
    smaller (the mask's padding is ignored) for training; for evaluation the short side is resized to ``base_size``
    (0: kept). Images bilinear, masks nearest. Randomness comes from torch's RNG, which the train loader seeds per
    (seed, epoch, sample), so a resumed run sees the same crops.

    Takes a float image (C, H, W), already normalised, and an integer mask (H, W).
    """

    def __init__(self, crop_size: int, base_size: int, scale_range: list[float] | tuple[float, float], train: bool) -> None:
        self.crop, self.base, self.scale_range, self.train = crop_size, base_size, tuple(scale_range), train

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        short = self.base or min(image.shape[-2:])
        if self.train:
            low, high = self.scale_range
            short = round(short * (low + (high - low) * torch.rand(()).item()))
        image, mask = _resize_short_side(image, mask, short)
        if not self.train:
            return image, mask
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        pad_h, pad_w = max(self.crop - image.shape[-2], 0), max(self.crop - image.shape[-1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(image.shape[-2] - self.crop + 1, ()))
        left = int(torch.randint(image.shape[-1] - self.crop + 1, ()))
        window = (..., slice(top, top + self.crop), slice(left, left + self.crop))
        return image[window].contiguous(), mask[window].contiguous()


def _resize_short_side(image: torch.Tensor, mask: torch.Tensor, short: int) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = image.shape[-2:]
    if min(height, width) == short:
        return image, mask
    scale = short / min(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(mask.dtype)
    return image, mask
