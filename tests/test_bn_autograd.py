"""BatchNorm where users go next: activation checkpointing (the replay in backward neither counts nor updates the
statistics again, and SyncBN communicates nothing more), a second-order gradient through SyncBatchNorm (a gradient
penalty) against BatchNorm on the global batch, models that hold ``torch.nn.SyncBatchNorm`` already, and the
template's ``train.grad_checkpointing``.

The layer cases in float64, at 1 process (no group: the layers' local paths) and 2 (one spawned gloo group for all
cases); the switch through real runs.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.bn import (
    AnyDimBatchNorm,
    SyncBatchNorm,
    SyncBatchNormAct,
    convert_ghost_batchnorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from engine.bn.layers import first_order_only, refuse_second_derivative
from engine.config import ModelConfig
from engine.grad_checkpointing import enable_grad_checkpointing
from engine.runtime.comm_debug import count_comm
from engine.runtime.spawn import spawn
from models import build_model
from tasks import main_output
from tests.helpers.jobs import (
    REPO_ROOT,
    error_lines,
    killed_and_resumed,
    run_train,
    run_train_preloaded,
    tiny_overrides,
    torch_load,
)
from tests.helpers.syncbn import span, sum_over_group

PER_RANK = 4
POSITIONS = ("first", "middle", "last")
MODES = ("sync", "sync-act", "ghost", "local")


def _block(position: str, mode: str) -> nn.Module:
    """A block with its BatchNorm first, in the middle or last, in one of the template's BatchNorm modes."""
    width = 3 if position == "first" else 4
    bn = nn.BatchNorm2d(width)
    layers = {"first": [bn, nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 1)],
              "middle": [nn.Conv2d(3, 4, 3, padding=1), bn, nn.Tanh(), nn.Conv2d(4, 4, 1)],
              "last": [nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 1), bn]}[position]  # fmt: skip
    block = nn.Sequential(*layers).double()
    if mode == "sync":
        return convert_sync_batchnorm(block, impl="ours")
    if mode == "ghost":
        return convert_ghost_batchnorm(block, 2)
    index = layers.index(bn)
    if mode == "sync-act":  # timm's BatchNormAct2d, converted
        block[index] = SyncBatchNormAct(width, act=nn.Tanh(), dtype=torch.float64)
    else:  # local: the template's own local layer (torch's BatchNorm2d counts a replay: PyTorch issue 96136)
        block[index] = AnyDimBatchNorm(width, dtype=torch.float64)
    return block


def _steps(block: nn.Module, rank: int, use_checkpoint: bool | None, steps: int = 2) -> list[torch.Tensor]:
    """Two training steps' outputs and gradients (input and parameters), then the BatchNorm buffers. Each step: a
    new batch (this rank's rows of a global one), forward (checkpointed: ``use_checkpoint`` is reentrant or not;
    None: plain), a loss weighted by fixed random numbers, backward."""
    seen = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        mine = span([PER_RANK] * 2, rank)  # this rank's rows of a global batch of two ranks' worth
        x = torch.randn(2 * PER_RANK, 3, 5, 5, generator=g, dtype=torch.float64)[mine]
        weights = torch.randn(2 * PER_RANK, 4, 5, 5, generator=g, dtype=torch.float64)[mine]
        x = x.clone().requires_grad_()
        out = block(x) if use_checkpoint is None else checkpoint(block, x, use_reentrant=use_checkpoint)
        (out * weights).sum().backward()
        seen += [out.detach(), x.grad, *(p.grad.clone() for p in block.parameters())]
        block.zero_grad()
    return seen + [b.clone().double() for b in block.buffers()]


def _checkpointed_as_plain(rank: int) -> list[str]:
    """Every (position, mode, reentrant, momentum): checkpointed equals plain; the same collectives in the same
    number (SyncBN's replay communicates nothing)."""
    failures = []
    for position, mode, reentrant, momentum in itertools.product(POSITIONS, MODES, (False, True), (0.1, None)):
        torch.manual_seed(0)
        block = _block(position, mode)
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
        plain = copy.deepcopy(block)
        with count_comm() as checkpointed_log:
            got = _steps(block, rank, reentrant)
        with count_comm() as plain_log:
            want = _steps(plain, rank, None)
        worst = max((a - b).abs().max().item() for a, b in zip(got, want))
        calls = (len(checkpointed_log.collectives), len(plain_log.collectives))
        if worst > 1e-10 or calls[0] != calls[1]:
            failures.append(f"{position} {mode} reentrant={reentrant} momentum={momentum}: {worst:.2e}, collectives "
                            f"{calls[0]} checkpointed / {calls[1]} plain")  # fmt: skip
    return failures


def test_checkpointed_batchnorm_equals_plain_on_one_process() -> None:
    assert _checkpointed_as_plain(0) == []


def _penalty_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A gradient penalty's parameter gradients: ||d sum(model(x)) / dx||^2, differentiated again."""
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(torch.tanh(model(x)).sum(), x, create_graph=True)
    (grad * grad).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _penalty_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 2, 1)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def _second_order(rank: int, world_size: int) -> float:
    """SyncBatchNorm's gradient penalty, parameter grads summed over ranks (as DDP does), against BatchNorm's on
    the global batch: the worst difference, relative to the largest gradient."""
    x = torch.randn(world_size * PER_RANK, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = _penalty_grads(_penalty_net(), x)
    mine = _penalty_grads(convert_sync_batchnorm(_penalty_net(), impl="ours"), x[span([PER_RANK] * world_size, rank)])
    got = [sum_over_group(g) for g in mine]
    largest = max(b.abs().max().item() for b in want)
    return max((a - b).abs().max().item() for a, b in zip(got, want)) / largest


def _distributed_cases(rank: int, world_size: int) -> dict:
    return {"checkpointing": _checkpointed_as_plain(rank), "second order": _second_order(rank, world_size)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return spawn(_distributed_cases, 2, timeout_s=240)


@pytest.mark.slow
def test_checkpointed_batchnorm_equals_plain_on_two_processes(two_ranks) -> None:
    assert [r["checkpointing"] for r in two_ranks] == [[], []]


@pytest.mark.slow
def test_a_gradient_penalty_through_syncbn_equals_batchnorm_on_the_global_batch(two_ranks) -> None:
    # relative to the largest gradient; the same formula in fp64 on the same numbers, another summation order
    assert max(r["second order"] for r in two_ranks) < 1e-12, two_ranks


def test_torchs_kernels_refuse_a_second_derivative_in_one_line() -> None:
    """torch's SyncBatchNorm (CUDA kernels, not differentiable twice) gets a hook from the converter: a backward
    that builds a graph through a layer that synchronised raises; a first-order backward passes. (The hook acts
    only where the layer synchronises, on CUDA with a process group: its gradient hook is checked here.)"""
    torch_layer = convert_sync_batchnorm(nn.BatchNorm2d(3), impl="torch")
    assert refuse_second_derivative in torch_layer._forward_hooks.values()
    x = torch.randn(4, requires_grad=True)
    y = x * x
    y.register_hook(first_order_only)
    with pytest.raises(RuntimeError, match="no second derivative .*syncbn.impl: ours"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    y = x * x
    y.register_hook(first_order_only)
    y.sum().backward()
    assert torch.equal(x.grad, 2 * x.detach())


def test_models_built_with_torch_syncbatchnorm_are_converted_and_reverted() -> None:
    """mmseg/mmdet-style models hold torch.nn.SyncBatchNorm, which refuses CPU tensors in a process group: converted
    to ours keeping tensors and the layer's own group; revert gives the very layer back; local mode makes it local."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4, momentum=0.3), nn.ReLU())
    original, weight, running = net[1], net[1].weight, net[1].running_var
    ours = convert_sync_batchnorm(net, impl="ours")
    assert type(ours[1]) is SyncBatchNorm and ours[1].weight is weight and ours[1].running_var is running
    assert ours[1].momentum == 0.3
    assert revert_sync_batchnorm(ours)[1] is original
    local = revert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(4)))
    assert type(local[0]) is AnyDimBatchNorm


# --------------------------------------------------------------------------------------------- train.grad_checkpointing

TIMM = dict(model__name="timm/mobilenetv3_small_050", model__kwargs="{}", data__num_train=64, data__num_val=32)


@pytest.mark.slow
def test_a_run_with_grad_checkpointing_ends_with_the_bits_of_the_run_without(tmp_path) -> None:
    """timm's MobileNetV3 (its BatchNormAct2d become SyncBatchNormAct) on 2 processes with SyncBN, through timm's
    own switch: the replay recomputes the very numbers, so weights and all BatchNorm buffers end bit-identical."""
    ends = {}
    for flag in (False, True):
        rc, out, err = run_train(tiny_overrides(tmp_path / str(flag), train__grad_checkpointing=flag, **TIMM), nproc=2,
                                 timeout=240)  # fmt: skip
        assert rc == 0, err[-3000:]
        ends[flag] = torch_load(tmp_path / str(flag) / "checkpoints" / "last.pt")["model"]
    assert "activation checkpointing: the model (BatchNorm statistics exact under the recompute)" in out
    assert "SyncBatchNormAct" in out
    assert [k for k in ends[False] if not torch.equal(ends[False][k], ends[True][k])] == []


@pytest.mark.slow
def test_a_checkpointed_run_killed_and_resumed_is_bit_identical(tmp_path) -> None:
    reference, resumed, _ = killed_and_resumed(tmp_path, train__grad_checkpointing=True,
                                               **{**TIMM, "data__num_train": 192})  # 24 steps: killed at 20
    assert [k for k in reference["model"] if not torch.equal(reference["model"][k], resumed["model"][k])] == []


@pytest.mark.parametrize(("overrides", "expect"), [
    (dict(model__name="small_detector", task="detection"),
     "error: train.grad_checkpointing: small_detector has no blocks to checkpoint (no set_grad_checkpointing(enable) "
     "method, no torchvision-style layer1..N stages); give it one or set train.grad_checkpointing=false"),
    (dict(syncbn__impl="torch"),
     "error: syncbn.impl: torch's SyncBatchNorm counts a checkpoint's replay twice and communicates again; with "
     "train.grad_checkpointing use auto or ours (ours on every device), got 'torch'"),
], ids=["no-blocks", "torch-syncbn"])  # fmt: skip
def test_what_cannot_be_checkpointed_is_one_line(tmp_path, overrides, expect) -> None:
    config = "detection.yaml" if overrides.get("task") == "detection" else "default.yaml"
    rc, _, err = run_train_preloaded(tiny_overrides(tmp_path / "run", train__grad_checkpointing=True, **overrides),
                                     config=str(REPO_ROOT / "configs" / config))  # fmt: skip
    assert rc == 1 and error_lines(err) == [expect], err[-3000:]


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20", "small_segnet", "resnet18", "deeplabv3_resnet50",
                                  "timm/resnet18", "smp/Unet"])  # fmt: skip
def test_what_each_model_family_checkpoints(name) -> None:
    """The switch reaches every family the template builds: the local models' and timm's own switch, torchvision's
    ResNet stages (also inside a segmentation backbone), an smp encoder from timm; evaluation is unchanged."""
    task = "segmentation" if name in ("small_segnet", "deeplabv3_resnet50", "smp/Unet") else "classification"
    kwargs = {"encoder_name": "tu-resnet18"} if name == "smp/Unet" else {}
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_classes=3, kwargs=kwargs), task).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    parts = enable_grad_checkpointing(model)
    expect = {"resnet18": ["layer1", "layer2", "layer3", "layer4"], "smp/Unet": ["encoder.model"],
              "deeplabv3_resnet50": [f"backbone.layer{i}" for i in range(1, 5)]}.get(name, ["the model"])  # fmt: skip
    assert parts == expect
    with torch.no_grad():
        got = model(x)
    assert torch.equal(main_output(got), main_output(want))
