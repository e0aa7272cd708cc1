"""Converting models to SyncBatchNorm / GhostBatchNorm and back: same tensors, flags and classes; state_dicts
that interchange with torch's layers; the impl choice and its errors (single process, no group needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.bn import (
    AnyDimBatchNorm,
    GhostBatchNorm,
    SyncBatchNorm,
    convert_ghost_batchnorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from tests.helpers.syncbn import randomize


def _bn_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4, momentum=None))
    )
    net.add_module("bn3d", nn.BatchNorm3d(2, affine=False))
    net[1].weight.requires_grad_(False)
    net[2][1].eval()
    randomize(net[1], 0)
    return net


def _tensors(model: nn.Module) -> list[Tensor]:
    """The tensors that make up the model's state (SyncBatchNorm's non-persistent event counter is not one)."""
    return list(model.state_dict(keep_vars=True).values())


def test_convert_keeps_tensors_flags_and_round_trips() -> None:
    net = _bn_net()
    tensors, flags = _tensors(net), [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    synced = convert_sync_batchnorm(net)
    layers = [synced[1], synced[2][1], synced.bn3d]
    assert synced is net and all(type(m) is SyncBatchNorm for m in layers)
    assert [type(m._original_batchnorm) for m in layers] == [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d]
    assert all(a is b for a, b in zip(_tensors(synced), tensors, strict=True))
    assert [m.training for m in synced.modules()] == flags
    assert not synced[1].weight.requires_grad and synced[1].bias.requires_grad
    assert synced[2][1].momentum is None and not synced.bn3d.affine
    assert convert_sync_batchnorm(synced) is synced and all(type(m) is SyncBatchNorm for m in layers)  # idempotent
    reverted = revert_sync_batchnorm(synced)
    assert [type(reverted[1]), type(reverted[2][1]), type(reverted.bn3d)] == [
        nn.BatchNorm2d,
        nn.BatchNorm1d,
        nn.BatchNorm3d,
    ]
    assert all(a is b for a, b in zip(_tensors(reverted), tensors, strict=True))
    assert [m.training for m in reverted.modules()] == flags
    for key, value in reverted.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_state_dicts_interchange_with_torch_syncbn_and_batchnorm() -> None:
    bn = nn.BatchNorm2d(4)
    randomize(bn, 1)
    ours = SyncBatchNorm(4)
    ours.load_state_dict(bn.state_dict())
    theirs = nn.SyncBatchNorm(4)
    theirs.load_state_dict(ours.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(theirs.state_dict())
    assert bn.state_dict().keys() == ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in bn.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


def test_impl_choice_torch_syncbn_revert_and_errors() -> None:
    torch_version = convert_sync_batchnorm(_bn_net(), impl="torch")
    assert all(type(m) is nn.SyncBatchNorm for m in torch_version.modules() if "BatchNorm" in type(m).__name__)
    assert type(convert_sync_batchnorm(nn.BatchNorm1d(3), impl="auto")) is SyncBatchNorm  # CPU: ours
    ours = convert_sync_batchnorm(torch_version, impl="ours")  # synchronised by torch: made ours (CPU-capable)
    assert type(ours[1]) is SyncBatchNorm and type(revert_sync_batchnorm(ours)[1]) is nn.BatchNorm2d
    assert type(convert_sync_batchnorm(ours, impl="torch")[1]) is nn.SyncBatchNorm
    # Converted by torch itself: the original class is unknown, so revert gives the any-rank BatchNorm.
    root = nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    weight = root.weight
    plain = revert_sync_batchnorm(root)
    assert type(plain) is AnyDimBatchNorm and plain.weight is weight
    assert plain(torch.randn(4, 2, 3)).shape == (4, 2, 3) and plain(torch.randn(4, 2)).shape == (4, 2)
    with pytest.raises(ValueError, match="auto, torch, ours"):
        convert_sync_batchnorm(_bn_net(), impl="apex")
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        convert_sync_batchnorm(nn.DataParallel(_bn_net()))
    assert type(convert_sync_batchnorm(nn.BatchNorm1d(3), impl="ours")) is SyncBatchNorm


def test_root_module_conversion_returns_new_module_with_same_tensors() -> None:
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3).eval()
    randomize(bn, 2)
    synced = convert_sync_batchnorm(bn, impl="ours")
    assert type(synced) is SyncBatchNorm and synced.weight is bn.weight and synced.running_var is bn.running_var
    assert (synced.eps, synced.momentum, synced.training) == (1e-3, 0.3, False)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(synced(x), bn(x))


def test_ghost_batchnorm_single_process_rules() -> None:
    net = _bn_net()
    tensors = _tensors(net)
    ghost = convert_ghost_batchnorm(net, virtual_splits=2)
    assert all(a is b for a, b in zip(_tensors(ghost), tensors, strict=True))
    assert type(ghost[1]) is GhostBatchNorm and ghost[1].virtual_splits == 2
    assert type(revert_sync_batchnorm(ghost)[1]) is nn.BatchNorm2d
    layer = GhostBatchNorm(3, virtual_splits=4)
    with pytest.raises(ValueError, match="not divisible by virtual_splits=4"):
        layer(torch.randn(6, 3))
    with pytest.raises(ValueError, match="positive int"):
        GhostBatchNorm(3, virtual_splits=0)
    ref = nn.BatchNorm2d(3)
    randomize(ref, 3)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(8, 3, 2, 2)
    ref.eval()
    layer.eval()
    assert torch.equal(layer(x), ref(x))  # eval: plain BatchNorm with running stats
    layer.train()
    chunks = [F.batch_norm(c, None, None, ref.weight, ref.bias, True) for c in x.split(2)]
    assert torch.allclose(layer(x), torch.cat(chunks), atol=1e-6)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert layer(x_cl).is_contiguous(memory_format=torch.channels_last)
