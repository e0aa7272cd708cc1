"""torchvision's FakeData: random images for throughput runs (nothing to learn)."""

from __future__ import annotations

from data.registry import DatasetPair, register_dataset
from engine.config import DataConfig


@register_dataset("fake")
def build_fake(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    from torchvision import datasets
    from torchvision import transforms as T

    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    to_tensor = T.ToTensor()
    train = datasets.FakeData(cfg.num_train, shape, num_classes, transform=to_tensor, random_offset=seed)
    val = datasets.FakeData(cfg.num_val, shape, num_classes, transform=to_tensor, random_offset=seed + cfg.num_train)
    return DatasetPair(train, val, num_classes)
