"""Every rank in the same SyncBN layer: an opt-in check before each synchronised call (``syncbn.check_calls``).

SyncBN's collectives pair up by order: the k-th synchronised call on one rank meets the k-th on every other. A model
whose control flow depends on the data (a head skipped on a rank that has no proposals) makes ranks pair different
layers: with equal channel counts their statistics mix silently, otherwise the collective fails or waits until the
process group's timeout. With the check, each training-mode call first all-gathers the layer's id (one integer per
rank: a small collective per layer and forward), and every rank stops with the same one line naming the layers.
An empty input is no such problem: the layer is still called, contributes a count of 0, and stays exact.
"""

from __future__ import annotations

import zlib
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from engine.bn.functional import active_group, all_gather_rows
from engine.bn.layers import SyncBatchNorm


class LayerCallsDiffer(RuntimeError):
    """The ranks are in different SyncBN layers (or one rank calls a layer the others skip)."""


def check_layer_calls(model: nn.Module) -> list[RemovableHandle]:
    """Make every synchronised BatchNorm of ``model`` check, before its collective, that all ranks of its group are
    calling the same layer; raises :class:`LayerCallsDiffer` on every rank of the group when they are not. Returns
    the hooks' handles (``handle.remove()`` ends the check)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm))]
    names = {_layer_id(name): name for name, _ in layers}
    return [layer.register_forward_pre_hook(partial(_same_layer, name=name, names=names)) for name, layer in layers]


def _layer_id(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFF_FFFF


def _same_layer(layer: nn.Module, inputs: tuple[Tensor, ...], name: str, names: dict[int, str]) -> None:
    sync = active_group(layer.process_group) if layer.training else None  # evaluation synchronises nothing
    if sync is None:
        return
    mine = torch.tensor([_layer_id(name)], dtype=torch.int64, device=layer.running_mean.device)
    ids = all_gather_rows(mine, *sync).view(-1).tolist()
    if len(set(ids)) > 1:
        where = ", ".join(f"rank {rank} in {names.get(i, 'a layer of another model')}" for rank, i in enumerate(ids))
        raise LayerCallsDiffer(f"syncbn.check_calls: the ranks called different SyncBN layers at once ({where}); "
                               "every rank must call every SyncBN layer in the same order in training (give a "
                               "head with nothing to do an empty batch rather than skipping it)")
