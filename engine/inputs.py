"""A batch of images as the model takes it, made on the device, once per batch (training, evaluation, PreciseBN).

The loader workers decode and augment uint8 images and ship uint8 batches: a quarter of float's bytes through
shared memory and pinned copies, and no per-sample float arithmetic on the CPU. Here they become float, scaled to
[0, 1] and normalised by the dataset's mean and std, in one fused pass on the device (and channels_last with
``train.channels_last``). Float batches (generated data, a dataset of your own) pass through as they are. A
detection batch is a list of images of their own sizes, and a list of target dicts; each is moved the same way.
"""

from __future__ import annotations

from typing import Any

import torch


class InputPrep:
    def __init__(self, device: torch.device, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 channels_last: bool = False) -> None:  # fmt: skip
        self.device, self.channels_last = device, channels_last
        mean, std = mean or (0.0,), std or (1.0,)
        # x / 255 - mean) / std == x * scale + shift, per channel
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(images, (list, tuple)):
            return [self(image[None])[0] for image in images]
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            # (N, C, H, W), or (N, V, C, H, W): V views of each image (contrastive)
            images = torch.addcmul(self.shift, images.float(), self.scale) if images.ndim >= 4 else images.float() / 255
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def targets(self, targets: Any) -> Any:
        """Labels or masks; for detection a list of dicts whose tensors all move."""
        if isinstance(targets, (list, tuple)):
            return [{key: self.targets(value) for key, value in target.items()} for target in targets]
        return targets.to(self.device, non_blocking=True) if isinstance(targets, torch.Tensor) else targets
