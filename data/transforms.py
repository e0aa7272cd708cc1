"""Transforms on uint8 image tensors (torchvision's transforms v2), and the evaluation preprocessing as data.

Decoding and augmentation run in the loader workers on uint8 (3, H, W) tensors; batches travel as uint8 (a quarter
of float's bytes through shared memory and pinned copies) and become float, normalised, on the device, once per
batch (``engine.inputs.InputPrep``). What evaluation does to an image file is a :class:`Preprocessing`: plain data,
saved in every checkpoint, from which the validation transform is built here and ``scripts/predict.py`` and
``scripts/export.py`` rebuild the same one. torchvision is imported inside the functions, so that importing
``data`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tasks import IGNORE_INDEX

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Preprocessing:
    """An image file at evaluation: decoded as RGB, its short side resized to ``resize`` (0: as stored), its center
    cropped to ``crop`` x ``crop`` (0: not cropped), then on the device scaled to [0, 1] and normalised by
    ``mean`` and ``std``. The same numbers make the validation transform, predict and export."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int = 0
    crop: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers): for checkpoints and the JSON beside an exported model."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(tuple(data["mean"]), tuple(data["std"]), int(data["resize"]), int(data["crop"]))

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The uint8 image transform of evaluation (resize the short side, center crop)."""
        from torchvision.transforms import v2

        steps = [v2.Resize(self.resize, antialias=True)] if self.resize else []
        steps += [v2.CenterCrop(self.crop)] if self.crop else []
        return v2.Compose(steps) if steps else v2.Identity()

    def fill(self) -> tuple[int, ...]:
        """The mean colour in uint8: what padding is filled with, so that it normalises to about 0."""
        return tuple(round(255 * m) for m in self.mean)


def imagenet_preprocessing(image_size: int) -> Preprocessing:
    """The classic ResNet evaluation: short side to image_size / 0.875, center crop image_size."""
    return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, resize=round(image_size / 0.875), crop=image_size)


def cifar_preprocessing(image_size: int) -> Preprocessing:
    """CIFAR's 32 px images as they are (any other image: short side and center crop to ``image_size``)."""
    return Preprocessing(CIFAR_MEAN, CIFAR_STD, resize=image_size, crop=image_size)


def cifar_train_transform(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pad-and-crop + flip, as in the CIFAR ResNet papers."""
    from torchvision.transforms import v2

    resize = [v2.Resize(image_size, antialias=True)] if image_size != 32 else []
    return v2.Compose([*resize, v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()])


class SegmentationTransform:
    """Image and mask together, as torchvision's segmentation reference does: a random rescale of the short side
    (``base_size`` x a factor from ``scale_range``), a horizontal flip and a random crop padded where the image is
    smaller (image padding ``fill``, the mean colour; mask padding ignored) for training; for evaluation the short
    side is resized to ``base_size`` (0: kept). Images bilinear (uint8 or float), masks nearest. Randomness comes
    from torch's RNG, which the train loader seeds per (seed, epoch, sample), so a resumed run sees the same crops.
    """

    def __init__(self, crop_size: int, base_size: int, scale_range: list[float] | tuple[float, float], train: bool,
                 fill: tuple[float, ...] = (0, 0, 0)) -> None:  # fmt: skip
        self.crop, self.base, self.scale_range, self.train = crop_size, base_size, tuple(scale_range), train
        self.fill = fill

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
        height, width = max(self.crop, image.shape[-2]), max(self.crop, image.shape[-1])
        if (height, width) != tuple(image.shape[-2:]):
            image, mask = _pad_bottom_right(image, mask, height, width, self.fill)
        top = int(torch.randint(image.shape[-2] - self.crop + 1, ()))
        left = int(torch.randint(image.shape[-1] - self.crop + 1, ()))
        window = (..., slice(top, top + self.crop), slice(left, left + self.crop))
        return image[window].contiguous(), mask[window].contiguous()


def _pad_bottom_right(image: torch.Tensor, mask: torch.Tensor, height: int, width: int,
                      fill: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    canvas = torch.tensor(fill, dtype=image.dtype).view(-1, 1, 1).expand(image.shape[0], height, width).clone()
    canvas[:, : image.shape[-2], : image.shape[-1]] = image
    padded = mask.new_full((height, width), IGNORE_INDEX)
    padded[: mask.shape[-2], : mask.shape[-1]] = mask
    return canvas, padded


def _resize_short_side(image: torch.Tensor, mask: torch.Tensor, short: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's short-side resize (the sizes :meth:`Preprocessing.transform` gives: predict and export
    preprocess exactly as evaluation did), the mask nearest to the image's new size."""
    from torchvision.transforms.v2 import functional as F

    if min(image.shape[-2:]) == short:
        return image, mask
    image = F.resize(image, short, antialias=True)
    resized = torch.nn.functional.interpolate(mask[None, None].float(), size=image.shape[-2:], mode="nearest-exact")
    return image, resized[0, 0].to(mask.dtype)
