"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle batches under ``data.root``: samples are the stored
uint8 arrays as tensors (no PIL round trip), augmented on uint8."""

from __future__ import annotations

import os

import torch

from data.registry import DataError, DatasetPair, register_dataset
from data.transforms import CIFAR_MEAN, CIFAR_STD, cifar_train_transform, classification_preprocessing
from engine.config import DataConfig


def _build(cfg: DataConfig, classes: int, num_classes: int) -> DatasetPair:
    if num_classes != classes:  # before touching the disk (or the network, with data.download)
        raise DataError(f"model.num_classes is {num_classes} but {cfg.name} has {classes} classes; "
                        f"set model.num_classes={classes}")
    defaults = DataConfig()
    for key in ("crop_scale", "crop_ratio"):
        if getattr(cfg, key) != getattr(defaults, key):
            raise DataError(f"data.{key}: {cfg.name} trains on pad-and-crop (the CIFAR papers' augmentation), not on "
                            "random-resized crops (image folders'); remove it")
    from torchvision import datasets

    base = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100
    folder = os.path.join(cfg.root, base.base_folder)

    class CIFAR(base):  # type: ignore[misc, valid-type]
        # Checksums are verified by torchvision when it downloads; an existing folder is trusted,
        # so a hand-made subset (as in the tests) loads too.
        def _check_integrity(self) -> bool:
            files = [name for name, _ in self.train_list + self.test_list]
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in files)

        def _load_meta(self) -> None:  # the same trust for batches.meta, which torchvision checks separately
            import pickle

            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            image = torch.from_numpy(self.data[index]).permute(2, 0, 1)  # HWC uint8 -> (3, H, W)
            return self.transform(image), int(self.targets[index])

    if not cfg.download and not os.path.isdir(folder):
        raise DataError(
            f"data.root: CIFAR-{classes} not found at {folder}; set data.download=true to fetch it, "
            "or point data.root at the folder that holds it"
        )
    preprocessing = classification_preprocessing(cfg, CIFAR_MEAN, CIFAR_STD, resize_ratio=1.0)  # 32 px as stored
    train_tf = cifar_train_transform(cfg, preprocessing.fill()) if cfg.augment else preprocessing.transform()
    try:
        train = CIFAR(cfg.root, train=True, transform=train_tf, download=cfg.download)
        val = CIFAR(cfg.root, train=False, transform=preprocessing.transform(), download=False)
    except (RuntimeError, OSError) as exc:
        raise DataError(f"data.root: cannot load CIFAR-{classes} from {folder}: {exc}") from None
    return DatasetPair(train, val, len(train.classes), class_names=list(train.classes), preprocessing=preprocessing)


@register_dataset("cifar10", num_classes=10)
def build_cifar10(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    """The files fix every sample, so ``seed`` has nothing to choose (augmentation is seeded by the loader)."""
    return _build(cfg, 10, num_classes)


@register_dataset("cifar100", num_classes=100)
def build_cifar100(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    """The files fix every sample, so ``seed`` has nothing to choose (augmentation is seeded by the loader)."""
    return _build(cfg, 100, num_classes)
