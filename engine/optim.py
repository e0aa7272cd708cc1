"""Optimizer, learning-rate scaling by global batch, and the per-step warmup + decay schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import TrainConfig

POLY_POWER = 0.9


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The goyal et al. rule: lr grows with the global batch (linearly, by sqrt, or not at all)."""
    ratio = global_batch / cfg.base_batch_size
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW; BatchNorm and bias parameters get no weight decay, as in the standard recipes."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step: linear warmup, then cosine, poly (DeepLab's (1 - progress) ** 0.9, as in
    torchvision's segmentation reference), step or constant."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    floor = cfg.min_lr / optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if cfg.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "poly":
            return floor + (1 - floor) * (1 - progress) ** POLY_POWER
        if cfg.schedule == "step":
            epoch = step // steps_per_epoch
            return cfg.step_gamma ** sum(epoch >= m for m in cfg.step_milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
