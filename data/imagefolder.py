"""Any folder of images laid out as ``root/{train,val}/<class>/<image>`` (the ImageNet layout), decoded to uint8
tensors by ``data.decoder`` and augmented on uint8: a random-resized crop (drawn before decoding, so large JPEGs
decode reduced where the crop allows) and a flip; evaluation: resize and center crop, decoded reduced where that
covers the resize."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from data.images import RandomResizedCropFile, decode_image
from data.registry import DataError, DatasetPair, register_dataset
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, classification_preprocessing, train_policies
from engine.config import DataConfig


class EvaluationFile:
    """An image file as evaluation sees it: decoded (reduced where that covers the resize), resized, cropped."""

    def __init__(self, preprocessing: Preprocessing, decoder: str) -> None:
        self.resize, self.decoder, self.transform = preprocessing.resize, decoder, preprocessing.transform()

    def __call__(self, path: str) -> torch.Tensor:
        return self.transform(decode_image(path, self.decoder, reduce_to=self.resize))


def train_transform(cfg: DataConfig, preprocessing: Preprocessing) -> Callable[[str], torch.Tensor]:
    """A training image file: its random-resized crop (``data.train_crop_size``, ``crop_scale``, ``crop_ratio``,
    ``interpolation``) and flip (``hflip_prob``), then the policies (``data.auto_augment``, ``random_erase``)."""
    from torchvision.transforms import v2

    crop = RandomResizedCropFile(cfg.train_crop_size or cfg.image_size, cfg.decoder, scale=cfg.crop_scale,
                                 ratio=cfg.crop_ratio, interpolation=cfg.interpolation, hflip_prob=cfg.hflip_prob)
    policies = train_policies(cfg, preprocessing.fill())
    return v2.Compose([crop, *policies]) if policies else crop


def class_count(cfg: DataConfig) -> int:
    """``model.num_classes`` 0: the class folders under ``data.root``/train (0 while there is no such folder: the
    config loads anywhere, and the run says what is missing when it builds the data)."""
    path = os.path.join(cfg.root, "train")
    return sum(entry.is_dir() for entry in os.scandir(path)) if os.path.isdir(path) else 0


def _folder(cfg: DataConfig, split: str, transform: Callable[[str], torch.Tensor]):
    """torchvision's ImageFolder over the paths (``loader=str``): decoding is the transform's, which knows the crop."""
    from torchvision import datasets

    path = os.path.join(cfg.root, split)
    if not os.path.isdir(path):
        raise DataError(f"data.root: no '{split}' folder at {path} (expected {cfg.root}/{{train,val}}/<class>/<image>)")
    try:
        return datasets.ImageFolder(path, transform=transform, loader=str)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.root: {path} holds no images in class folders ({str(exc).splitlines()[0]})") from None


@register_dataset("imagefolder", num_classes=class_count, image_files=True)
def build_imagefolder(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    if not os.path.isdir(cfg.root):
        raise DataError(f"data.root: folder not found: {cfg.root}")
    preprocessing = classification_preprocessing(cfg, IMAGENET_MEAN, IMAGENET_STD)
    evaluation = EvaluationFile(preprocessing, cfg.decoder)
    train = _folder(cfg, "train", train_transform(cfg, preprocessing) if cfg.augment else evaluation)
    val = _folder(cfg, "val", evaluation)
    if val.classes != train.classes:
        raise DataError(f"data.root: {cfg.root}/val has classes {len(val.classes)} that differ from train's")
    return DatasetPair(train, val, len(train.classes), class_names=list(train.classes), preprocessing=preprocessing)
