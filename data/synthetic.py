"""A generated image-classification task: deterministic from the seed, learnable, no files needed.

Each class is a smooth random colour pattern; a sample is its class pattern,
shifted by a few pixels and buried in pixel noise. A small CNN learns it to
well above chance in a few epochs, so the default run shows real learning on
any machine, offline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.registry import DatasetPair, register_dataset
from engine.config import DataConfig

MAX_SHIFT = 8  # pixels of per-sample translation baked into the data
NOISE_STD = 6.0


def _class_patterns(num_classes: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(num_classes, channels, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _make_split(patterns: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes, channels, size, _ = patterns.shape
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (count, 2), generator=generator)
    images = torch.empty(count, channels, size, size)
    for i in range(count):
        images[i] = torch.roll(patterns[labels[i]], shifts=tuple(shifts[i].tolist()), dims=(1, 2))
    images += NOISE_STD * torch.randn(images.shape, generator=generator)
    return images, labels


class SyntheticImages(Dataset):
    """In-memory tensors; ``augment`` adds a random flip and a random shift drawn from torch's RNG."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        return image, int(self.labels[index])


@register_dataset("synthetic")
def build_synthetic(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    generator = torch.Generator().manual_seed(seed)
    patterns = _class_patterns(num_classes, cfg.channels, cfg.image_size, generator)
    # flip-symmetric patterns, so the flip augmentation keeps every label true
    patterns = 0.5 * (patterns + patterns.flip(-1))
    train = SyntheticImages(*_make_split(patterns, cfg.num_train, generator), augment=cfg.augment)
    val = SyntheticImages(*_make_split(patterns, cfg.num_val, generator), augment=False)
    return DatasetPair(train, val, num_classes)
