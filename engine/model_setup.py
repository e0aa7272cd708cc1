"""The run's model as configured: on its device, in its memory format, its BatchNorm converted as ``syncbn.*`` says;
and when its BatchNorm statistics are settled. One place, used by the entry script, the scripts and the benchmarks,
so that they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.bn import (
    DEFAULT_SAMPLES,
    Forward,
    RunningStatistics,
    SettlePolicy,
    UnsupportedBatchNorm,
    check_layer_calls,
    convert_ghost_batchnorm,
    convert_local_batchnorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from engine.config import Config
from engine.ema import ModelEma
from engine.errors import ModelError
from engine.grad_checkpointing import enable_grad_checkpointing
from engine.runtime.distributed import DistContext
from engine.trainer import amp_dtype

if TYPE_CHECKING:
    from tasks.registry import Task  # the interface only: engine/ imports no task


def prepare_model(model: nn.Module, cfg: Config, ctx: DistContext) -> nn.Module:
    """``model`` moved to the run's device (channels_last with ``train.channels_last``, its blocks checkpointed with
    ``train.grad_checkpointing``), every BatchNorm made SyncBatchNorm over ``ctx.sync_group`` (each call checked to
    be the same layer on every rank with ``syncbn.check_calls``), ghost BatchNorm, or local (synchronised layers the
    model came with made local too), as ``syncbn.*`` resolved; a BatchNorm class no converter knows, or a model
    without blocks to checkpoint, is a one-line error naming it."""
    model = model.to(ctx.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.grad_checkpointing and not enable_grad_checkpointing(model):
        raise ModelError(f"train.grad_checkpointing: {cfg.model.name} has no blocks to checkpoint (no "
                         "set_grad_checkpointing(enable) method, no torchvision-style layer1..N stages); give it one "
                         "or set train.grad_checkpointing=false")
    try:
        if cfg.syncbn.enabled:
            # under activation checkpointing ours on every device: torch's kernels would replay the statistics
            impl = "ours" if cfg.train.grad_checkpointing else cfg.syncbn.impl
            model = convert_sync_batchnorm(model, ctx.sync_group, impl=impl, collective=cfg.syncbn.collective)
            if cfg.syncbn.check_calls:
                check_layer_calls(model)
            return model
        if cfg.syncbn.virtual_splits > 1:
            return convert_ghost_batchnorm(model, cfg.syncbn.virtual_splits)
        if cfg.train.grad_checkpointing:  # the template's local layers: a replay counts nothing twice
            return convert_local_batchnorm(model)
        return revert_sync_batchnorm(model)  # local BatchNorm: also a model built with torch.nn.SyncBatchNorm
    except UnsupportedBatchNorm as exc:
        raise ModelError(f"model.name: {cfg.model.name}: {exc}") from None


def settle_policy(cfg: Config, world_size: int) -> SettlePolicy:
    """How the run's statistics become fit to evaluate and save, from ``syncbn.*`` and ``train.amp``."""
    return SettlePolicy(
        synchronised=cfg.syncbn.enabled and cfg.syncbn.group_size in (0, world_size),  # SyncBN groups differ
        buffer_policy=cfg.syncbn.buffer_policy,
        amp_dtype=amp_dtype(cfg.train.amp),
    )


def precise_forward(task: Task) -> Forward:
    """PreciseBN's pass over an (images, targets) batch: the task's training forward (its loss unused)."""
    return lambda module, batch: task.training_loss(module, *batch)


def running_statistics(cfg: Config, world_size: int, model: nn.Module, ema: ModelEma | None = None,
                       report: Callable[[str], None] | None = None, task: Task | None = None,
                       precise_batches: Iterable[Any] | None = None) -> RunningStatistics:  # fmt: skip
    """When the run's BatchNorm statistics settle: the model's by PreciseBN over ``syncbn.precise_bn_samples``
    (else made to agree across ranks), the EMA's by PreciseBN under ``train.ema_buffers: precise``. PreciseBN's
    passes run the ``task``'s training forward (a detector needs its targets), without the gradients."""
    forward = precise_forward(task) if task is not None else None
    stats = RunningStatistics(settle_policy(cfg, world_size), precise_batches, report, forward)
    stats.track(model, cfg.syncbn.precise_bn_samples)
    if ema is not None:
        precise = cfg.train.ema_buffers == "precise"
        stats.track(ema.module, (cfg.syncbn.precise_bn_samples or DEFAULT_SAMPLES) if precise else 0)
    return stats
