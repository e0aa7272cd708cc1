"""torchvision's FakeData: random images for throughput runs (nothing to learn), as uint8 tensors like real files."""

from __future__ import annotations

from data.registry import DatasetPair, register_dataset
from data.transforms import Preprocessing
from engine.config import DataConfig


@register_dataset("fake")
def build_fake(cfg: DataConfig, num_classes: int, seed: int) -> DatasetPair:
    from torchvision import datasets
    from torchvision.transforms import v2

    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    to_tensor = v2.PILToTensor()
    train = datasets.FakeData(cfg.num_train, shape, num_classes, transform=to_tensor, random_offset=seed)
    val = datasets.FakeData(cfg.num_val, shape, num_classes, transform=to_tensor, random_offset=seed + cfg.num_train)
    return DatasetPair(train, val, num_classes, preprocessing=Preprocessing((0.5,) * cfg.channels, (0.25,) * cfg.channels))
