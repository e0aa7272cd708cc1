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

from engine.config import DataConfig
from engine.errors import ConfigError
from tasks import IGNORE_INDEX

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Preprocessing:
    """An image file at evaluation: decoded as RGB, its short side resized to ``resize`` (0: as stored) with
    ``interpolation``, its center cropped to ``crop`` x ``crop`` (0: not cropped), then on the device scaled to
    [0, 1] and normalised by ``mean`` and ``std`` (one value each: every channel). The same numbers make the
    validation transform, predict and export."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int = 0
    crop: int = 0
    interpolation: str = "bilinear"

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers): for checkpoints and the JSON beside an exported model."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """(A checkpoint written before ``interpolation`` was kept resized bilinearly.)"""
        return cls(tuple(data["mean"]), tuple(data["std"]), int(data["resize"]), int(data["crop"]),
                   data.get("interpolation", "bilinear"))  # fmt: skip

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The uint8 image transform of evaluation (resize the short side, center crop)."""
        from torchvision.transforms import v2

        steps = [v2.Resize(self.resize, interpolation(self.interpolation), antialias=True)] if self.resize else []
        steps += [v2.CenterCrop(self.crop)] if self.crop else []
        return v2.Compose(steps) if steps else v2.Identity()

    def fill(self) -> tuple[int, ...]:
        """The mean colour in uint8 (3 channels): what padding and erasing fill with, so that it normalises to ~0."""
        mean = self.mean * 3 if len(self.mean) == 1 else self.mean
        return tuple(round(255 * m) for m in mean)


def interpolation(name: str):
    """``data.interpolation``'s name as torchvision's InterpolationMode."""
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def classification_preprocessing(cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...],
                                 resize_ratio: float = 0.875) -> Preprocessing:  # fmt: skip
    """Evaluation as the config says: center crop ``data.val_crop_size`` (0: ``data.image_size``) of the short side
    resized to ``data.val_resize_size`` (0: the crop / ``resize_ratio``, the classic 224 / 256), normalised by
    ``data.mean`` / ``data.std`` where given, else by the dataset's ``mean`` / ``std``."""
    crop = cfg.val_crop_size or cfg.image_size
    resize = cfg.val_resize_size or round(crop / resize_ratio)
    return Preprocessing(tuple(cfg.mean) or mean, tuple(cfg.std) or std, resize, crop, cfg.interpolation)


def cifar_train_transform(cfg: DataConfig, fill: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pad-and-crop + flip, as in the CIFAR ResNet papers, then :func:`train_policies`."""
    from torchvision.transforms import v2

    size = cfg.train_crop_size or cfg.image_size
    resize = [v2.Resize(size, interpolation(cfg.interpolation), antialias=True)] if size != 32 else []
    return v2.Compose([*resize, v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(cfg.hflip_prob),
                       *train_policies(cfg, fill)])  # fmt: skip


AUTO_AUGMENT = {"trivialaugment_wide": "TrivialAugmentWide", "randaugment": "RandAugment", "augmix": "AugMix",
                "autoaugment_imagenet": "AutoAugment", "autoaugment_cifar10": "AutoAugment",
                "autoaugment_svhn": "AutoAugment"}  # fmt: skip


def train_policies(cfg: DataConfig, fill: tuple[int, ...]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """What classification training adds after its crop and flip, on uint8 images, in torchvision's reference
    order: ``data.auto_augment`` (torchvision v2's policy, with ``data.auto_augment_kwargs``; its warps bilinear, or
    nearest with ``data.interpolation: nearest``), then ``data.random_erase`` (a rectangle set to the mean colour ``fill``: the
    reference erases to 0 after normalising, the same colour)."""
    from torchvision.transforms import v2

    steps = []
    if cfg.auto_augment != "none":
        kwargs = dict(cfg.auto_augment_kwargs)
        if cfg.auto_augment.startswith("autoaugment_"):
            kwargs.setdefault("policy", v2.AutoAugmentPolicy(cfg.auto_augment.removeprefix("autoaugment_")))
        # their rotations and shears are affine warps, which torchvision does on tensors nearest or bilinear only
        warp = interpolation("nearest" if cfg.interpolation == "nearest" else "bilinear")
        try:
            steps.append(getattr(v2, AUTO_AUGMENT[cfg.auto_augment])(interpolation=warp, **kwargs))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data.auto_augment_kwargs: {cfg.auto_augment} rejected {kwargs}: {exc}") from None
    if cfg.random_erase > 0:
        steps.append(v2.RandomErasing(cfg.random_erase, value=list(fill)))
    return steps


class SegmentationTransform:
    """Image and mask together, as torchvision's segmentation reference does: a random rescale of the short side
    (``base_size`` x a factor from ``scale_range``), a horizontal flip (``hflip_prob``) and a random crop padded
    where the image is smaller (image padding ``fill``, the mean colour; mask padding ignored) for training; for
    evaluation the short side is resized to ``base_size`` (0: kept). Images bilinear (uint8 or float), masks
    nearest. Randomness comes from torch's RNG, which the train loader seeds per (seed, epoch, sample), so a resumed
    run sees the same crops.
    """

    def __init__(self, crop_size: int, base_size: int, scale_range: list[float] | tuple[float, float], train: bool,
                 fill: tuple[float, ...] = (0, 0, 0), hflip_prob: float = 0.5) -> None:  # fmt: skip
        self.crop, self.base, self.scale_range, self.train = crop_size, base_size, tuple(scale_range), train
        self.fill, self.hflip_prob = fill, hflip_prob

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        short = self.base or min(image.shape[-2:])
        if self.train:
            low, high = self.scale_range
            short = round(short * (low + (high - low) * torch.rand(()).item()))
        image, mask = _resize_short_side(image, mask, short)
        if not self.train:
            return image, mask
        if torch.rand(()) < self.hflip_prob:
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
