"""BatchNorm done right on any number of processes: the subject of this template, in one package.

One concern per file; the public names are all importable from here (``from engine.bn import ...``):

- ``functional``: the math of global-batch BatchNorm (moments, their combination over ranks, the autograd function
  with one collective forward and one backward);
- ``layers``: :class:`SyncBatchNorm` (any device and backend), :class:`GhostBatchNorm`, :class:`AnyDimBatchNorm`,
  and their BatchNorm-then-dropout-then-activation forms (timm's ``BatchNormAct2d``, kept what it is);
- ``convert``: :func:`convert_sync_batchnorm`, :func:`convert_ghost_batchnorm`, :func:`convert_local_batchnorm`,
  :func:`revert_sync_batchnorm`,
  through one registry keyed by exact class (:func:`register_batchnorm`); unknown subclasses refused by name;
- ``buffers``: :func:`sync_bn_buffers`, running statistics that agree across ranks trained without SyncBN;
- ``precise``: :func:`recompute_bn_stats` (PreciseBN), exact population statistics at any world size;
- ``settle``: :class:`RunningStatistics`, the one place that decides *when* statistics are settled (before an
  evaluation, before a save; for the model, its EMA and the scripts);
- ``calls``: :func:`check_layer_calls`, every rank in the same SyncBN layer before each collective (opt-in);
- ``recompute``: under activation checkpointing, the replay in backward neither counts nor updates the statistics
  again, and SyncBN takes back its first forward's global statistics instead of communicating again.

The package imports only torch, so it can be copied into another project as is.
"""

from engine.bn.buffers import sync_bn_buffers
from engine.bn.calls import LayerCallsDiffer, check_layer_calls
from engine.bn.convert import (
    PLAIN,
    THEN_DROP_ACT,
    BatchNormFamily,
    UnsupportedBatchNorm,
    batchnorm_layers,
    convert_ghost_batchnorm,
    convert_local_batchnorm,
    convert_sync_batchnorm,
    family_of,
    register_batchnorm,
    revert_sync_batchnorm,
)
from engine.bn.functional import choose_collective
from engine.bn.layers import (
    AnyDimBatchNorm,
    BatchNormAct,
    GhostBatchNorm,
    GhostBatchNormAct,
    SyncBatchNorm,
    SyncBatchNormAct,
    TorchSyncBatchNormAct,
    check_values_per_channel,
)
from engine.bn.precise import DEFAULT_SAMPLES, Forward, recompute_bn_stats
from engine.bn.settle import RunningStatistics, SettlePolicy

__all__ = [
    "DEFAULT_SAMPLES",
    "Forward",
    "PLAIN",
    "THEN_DROP_ACT",
    "AnyDimBatchNorm",
    "BatchNormAct",
    "BatchNormFamily",
    "GhostBatchNorm",
    "GhostBatchNormAct",
    "LayerCallsDiffer",
    "RunningStatistics",
    "SettlePolicy",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "TorchSyncBatchNormAct",
    "UnsupportedBatchNorm",
    "batchnorm_layers",
    "check_layer_calls",
    "check_values_per_channel",
    "choose_collective",
    "convert_ghost_batchnorm",
    "convert_local_batchnorm",
    "convert_sync_batchnorm",
    "family_of",
    "recompute_bn_stats",
    "register_batchnorm",
    "revert_sync_batchnorm",
    "sync_bn_buffers",
]
