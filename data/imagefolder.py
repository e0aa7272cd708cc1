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
from data.transforms import Preprocessing, imagenet_preprocessing
from engine.config import DataConfig


class EvaluationFile:
    """An image file as evaluation sees it: decoded (reduced where that covers the resize), resized, cropped."""

    def __init__(self, preprocessing: Preprocessing, decoder: str) -> None:
        self.resize, self.decoder, self.transform = preprocessing.resize, decoder, preprocessing.transform()

    def __call__(self, path: str) -> torch.Tensor:
        return self.transform(decode_image(path, self.decoder, reduce_to=self.resize))


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


@register_dataset("imagefolder")
def build_imagefolder(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    if not os.path.isdir(cfg.root):
        raise DataError(f"data.root: folder not found: {cfg.root}")
    preprocessing = imagenet_preprocessing(cfg.image_size)
    evaluation = EvaluationFile(preprocessing, cfg.decoder)
    train = _folder(cfg, "train", RandomResizedCropFile(cfg.image_size, cfg.decoder) if cfg.augment else evaluation)
    val = _folder(cfg, "val", evaluation)
    if val.classes != train.classes:
        raise DataError(f"data.root: {cfg.root}/val has classes {len(val.classes)} that differ from train's")
    return DatasetPair(train, val, len(train.classes), class_names=list(train.classes), preprocessing=preprocessing)
