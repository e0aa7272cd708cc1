"""Running statistics that agree on every rank, for models trained without SyncBN (each rank's drift apart).

With SyncBN they are bit-identical on every rank already and nothing here is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from engine.bn.convert import batchnorm_layers
from engine.bn.functional import active_group, all_gather_rows

VALID_POLICIES = ("broadcast", "reduce")


def sync_bn_buffers(module: nn.Module, policy: str = "broadcast", process_group: Any | None = None) -> None:
    """Make the running stats of every BatchNorm equal on all ranks.

    "broadcast": take (group) rank 0's, as DDP's broadcast_buffers does. "reduce": pool the ranks with equal
    weights: mean of the running means, and mean of the running vars plus the spread of the per-rank means
    (mean of (mean_r - pooled_mean)^2). num_batches_tracked is rank 0's. All layers travel in one collective.
    No-op without a process group, with a group of size 1, or on a rank outside ``process_group``.
    """
    if policy not in VALID_POLICIES:
        raise ValueError(f"sync_bn_buffers: policy must be one of {', '.join(VALID_POLICIES)}; got {policy!r}")
    sync = active_group(process_group)
    layers = [layer for _, layer in batchnorm_layers(module)]
    if sync is None or not layers:
        return
    group, world_size = sync
    flat = _pack_buffers(layers)
    if policy == "broadcast":
        src = 0 if process_group is None else dist.get_global_rank(group, 0)
        dist.broadcast(flat, src=src, group=group)
    else:
        flat = _pool_buffers(all_gather_rows(flat, group, world_size), layers)
    with torch.no_grad():
        _unpack_buffers(layers, flat)


def _buffers_of(layers: list[_BatchNorm]) -> list[Tensor]:
    """[means..., vars..., num_batches_tracked...]: the order the packed vector holds them in."""
    tensors = [m.running_mean for m in layers] + [m.running_var for m in layers]
    return tensors + [m.num_batches_tracked.view(1) for m in layers if m.num_batches_tracked is not None]


def _pack_buffers(layers: list[_BatchNorm]) -> Tensor:
    """All running stats as one fp64 vector (fp64 holds them exactly)."""
    return torch.cat([t.reshape(-1).to(torch.float64) for t in _buffers_of(layers)])


def _unpack_buffers(layers: list[_BatchNorm], flat: Tensor) -> None:
    offset = 0
    for t in _buffers_of(layers):
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _pool_buffers(rows: Tensor, layers: list[_BatchNorm]) -> Tensor:
    """Equal-weight pooling of gathered [means, vars, counters] rows; two-pass, so large means do not cancel."""
    channels = sum(m.running_mean.numel() for m in layers)
    means, variances = rows[:, :channels], rows[:, channels : 2 * channels]
    pooled_mean = means.mean(0)
    pooled_var = variances.mean(0) + ((means - pooled_mean) ** 2).mean(0)
    return torch.cat([pooled_mean, pooled_var, rows[0, 2 * channels :]])
