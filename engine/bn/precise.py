"""PreciseBN: running statistics replaced by the exact population statistics of the training data, for the current
weights (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021), on any number of ranks.

Training's running averages mix the statistics of many past weights and are noisy at small batches; recomputing
them with the weights frozen makes evaluation reflect the model as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from engine.bn.convert import batchnorm_layers
from engine.bn.functional import active_group, all_gather_rows, local_moments, statistics_dtype
from engine.bn.layers import SyncBatchNorm

DEFAULT_SAMPLES = 4096  # when the user leaves the number open: detectron2's 200 x 16 images, rounded up


def _batch_moments(x: Tensor) -> tuple[float, Tensor, Tensor]:
    """(count, mean, M2) per channel of one layer input: the layer's own fused Welford pass (:func:`local_moments`),
    the count taken from the shape (no device-to-host sync inside the forward), the moments kept in fp64."""
    count = float(x.numel() // x.size(1))
    _, mean, m2 = local_moments(x.detach(), statistics_dtype(x.dtype))
    return count, mean.double(), m2.double()


def _merge(a: tuple[float, Tensor, Tensor], b: tuple[float, Tensor, Tensor]) -> tuple[float, Tensor, Tensor]:
    """Chan et al.'s pairwise merge of two (count, mean, M2) summaries; counts are host numbers."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return a
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


Forward = Callable[[nn.Module, Any], Any]  # one training-mode pass of a model over a batch


def _inputs(batch: Any) -> Any:
    """A batch's input: the batch itself, or the first item of a tuple or list (the loaders' (input, target))."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _empty_like(batch: Any) -> Any:
    """A batch of no samples shaped like ``batch`` (tensor inputs only)."""
    inputs = _inputs(batch)
    if not isinstance(inputs, Tensor):
        raise ValueError("recompute_bn_stats: the ranks' batches ran out at different times, and a batch of lists "
                         "(detection) has no empty form; give every rank the same number of batches")
    return (inputs[:0], *batch[1:]) if isinstance(batch, (tuple, list)) else inputs[:0]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Any], num_samples: int, forward: Forward | None = None) -> int:
    """PreciseBN: set every BatchNorm's running stats to the population statistics of the values it sees.

    With the weights frozen (no grad, no optimizer), runs training-mode forward passes over ``batches`` (input
    tensors, or tuples whose first item is the input; every rank passes its own shard; ``forward(model, batch)``
    runs a pass where the model needs more than its input, as a detector needs its targets) until ``num_samples``
    samples have been seen over all ranks, and sets each BatchNorm's ``running_mean`` to the mean and
    ``running_var`` to the unbiased variance of every value that layer saw (every position of every sample),
    merged with Chan's formula in fp64, identical on every rank. Returns the global number of samples used.

    Every rank runs the same number of forward passes (SyncBN's collectives must match): a rank whose shard is
    exhausted feeds empty batches while others still have data. With SyncBN each pass normalises with the global
    batch's statistics, so the result does not depend on the world size. Without SyncBN (or with ghost BatchNorm)
    each rank's pass normalises with its own (or its split's) statistics, as training did: the population
    statistics are then those of the activations training produced, pooled over all ranks.
    """
    layers = [layer for _, layer in batchnorm_layers(model)]
    if not layers:
        return 0
    summaries: dict[_BatchNorm, tuple[Tensor, Tensor, Tensor]] = {}

    def record(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        seen = _batch_moments(inputs[0])
        summaries[layer] = _merge(summaries[layer], seen) if layer in summaries else seen

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    was_training = model.training
    device = layers[0].running_mean.device
    synchronised = any(isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) for m in layers)
    sync = active_group(None)
    if forward is None:
        def forward(module: nn.Module, batch: Any) -> Any:
            return module(_inputs(batch).to(device, non_blocking=True))
    model.train()
    total, template, iterator = 0, None, iter(batches)
    try:
        while total < num_samples:
            batch = next(iterator, None)
            template = batch if batch is not None else template
            mine = 0 if batch is None else len(_inputs(batch))
            # one small all-reduce per pass: the global sample count, and whether some rank has no batch at all
            agreed = torch.tensor([mine, template is None], dtype=torch.float64, device=device)
            if sync is not None:
                dist.all_reduce(agreed, group=sync[0])
            samples, shapeless = (int(v) for v in agreed.tolist())
            if samples == 0:
                break  # every shard is exhausted
            if shapeless:
                raise ValueError("recompute_bn_stats: every rank needs at least one batch (an input shape)")
            total += samples
            if batch is None and synchronised:  # keep SyncBN's collectives matched with an empty batch
                batch = _empty_like(template)
            if batch is not None:
                forward(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    _set_population_stats(layers, summaries, sync)
    return total


def _set_population_stats(layers: list[_BatchNorm], summaries: dict, sync: tuple[Any, int] | None) -> None:
    """Merge every rank's summaries (one all-gather for all layers, folded in rank order) and set the buffers."""
    parts = []
    for layer in layers:
        zeros = torch.zeros_like(layer.running_mean, dtype=torch.float64)
        count, mean, m2 = summaries.get(layer, (0.0, zeros, zeros))
        parts += [mean.new_tensor([count]), mean, m2]
    flat = torch.cat(parts)
    rows = all_gather_rows(flat, sync[0], sync[1]) if sync is not None else flat[None]
    offset = 0
    for layer in layers:
        channels = layer.num_features
        merged = None
        for row, count in zip(rows, rows[:, offset].tolist()):
            summary = (count, row[offset + 1 : offset + 1 + channels], row[offset + 1 + channels : offset + 1 + 2 * channels])
            merged = summary if merged is None else _merge(merged, summary)
        offset += 1 + 2 * channels
        count, mean, m2 = merged
        if count > 1:
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_((m2 / (count - 1)).to(layer.running_var.dtype))
