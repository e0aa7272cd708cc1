"""Any folder of images laid out as ``root/{train,val}/<class>/<image>`` (the ImageNet layout)."""

from __future__ import annotations

import os

from data.registry import DataError, DatasetPair, register_dataset
from data.transforms import imagenet_transforms
from engine.config import DataConfig


def _folder(cfg: DataConfig, split: str, transform):
    from torchvision import datasets

    path = os.path.join(cfg.root, split)
    if not os.path.isdir(path):
        raise DataError(f"data.root: no '{split}' folder at {path} (expected {cfg.root}/{{train,val}}/<class>/<image>)")
    try:
        return datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.root: {path} holds no images in class folders ({str(exc).splitlines()[0]})") from None


@register_dataset("imagefolder")
def build_imagefolder(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    if not os.path.isdir(cfg.root):
        raise DataError(f"data.root: folder not found: {cfg.root}")
    train_tf, val_tf = imagenet_transforms(cfg.image_size, cfg.augment)
    train = _folder(cfg, "train", train_tf)
    val = _folder(cfg, "val", val_tf)
    if val.classes != train.classes:
        raise DataError(f"data.root: {cfg.root}/val has classes {len(val.classes)} that differ from train's")
    return DatasetPair(train, val, len(train.classes))
