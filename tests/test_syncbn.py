"""engine.syncbn against BatchNorm on the concatenated batch, in real gloo processes.

Process start-up dominates (torch import on slow cores), so every distributed check is a "case" run inside ONE
spawned group per world size; each case collects its mismatches and asserts only after its last collective, so a
failing case does not desynchronise the next. Each case is still its own pytest item. References are always
computed independently: the whole batch is generated from a seed on every rank and fed to torch's BatchNormNd.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.syncbn import (
    AnyDimBatchNorm,
    GhostBatchNorm,
    SyncBatchNorm,
    convert_ghost_batchnorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
    sync_bn_buffers,
)
from tests.dist_utils import run_distributed

CHANNELS = 3
TAILS = {2: (), 3: (4,), 4: (3, 4), 5: (2, 3, 2)}  # trailing dims per input rank
SIZES = {  # per-rank batch sizes
    "equal": {2: [4, 4], 3: [3, 3, 3]},
    "uneven": {2: [5, 2], 3: [4, 1, 3]},
    "empty": {2: [5, 0], 3: [3, 0, 4]},
    "ones": {2: [1, 1], 3: [1, 1, 1]},  # each rank alone would be BatchNorm's count-1 error
}


# --------------------------------------------------------------------------------------------- helpers


def _bn_class(ndim: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def _batch(seed: int, n: int, tail: tuple[int, ...], dtype: torch.dtype, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """The whole global batch and an upstream gradient, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CHANNELS, *tail, generator=gen, dtype=torch.float64) * 2 + 0.5 + offset
    g = torch.randn(n, CHANNELS, *tail, generator=gen, dtype=torch.float64)
    return x.to(dtype), g


def _span(sizes: list[int], rank: int) -> slice:
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def _close(errs: list[str], what: str, got: Tensor, want: Tensor, atol: float, rtol: float = 0.0) -> None:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        errs.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    elif not torch.allclose(got, want, atol=atol, rtol=rtol):
        errs.append(f"{what}: max abs err {(got - want).abs().max().item():.3e} > atol {atol:.1e}")


def _identical_on_all_ranks(errs: list[str], what: str, t: Tensor, group: Any = None) -> None:
    """Bitwise equality of ``t`` across the group (one all_gather)."""
    size = dist.get_world_size(group)
    rows = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(rows, t.contiguous(), group=group)
    if not all(torch.equal(rows[0], r) for r in rows):
        errs.append(f"{what}: differs across ranks")


def _sum_over_group(t: Tensor, group: Any = None) -> Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _randomize(bn: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)


_COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "barrier")
_SENT_ARG = {"all_gather_single": 1, "all_gather_into_tensor": 1, "all_gather": 1, "all_reduce": 0, "broadcast": 0}


@contextlib.contextmanager
def _count_collectives() -> Iterator[list[tuple[str, int, torch.dtype]]]:
    """Record (name, numel sent, dtype) of every torch.distributed collective called while active."""
    calls: list[tuple[str, int, torch.dtype]] = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            idx = _SENT_ARG.get(name)
            sent = args[idx] if idx is not None and len(args) > idx else None
            calls.append((name, sent.numel() if sent is not None else 0, sent.dtype if sent is not None else None))
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _compare_with_bn(
    errs: list[str],
    tag: str,
    sizes: list[int],
    ndim: int,
    *,
    rank: int,
    dtype: torch.dtype = torch.float64,
    steps: int = 1,
    bn_kwargs: dict | None = None,
    memory_format: torch.memory_format | None = None,
    atol: float = 1e-10,
    group: Any = None,
    seed: int = 0,
) -> SyncBatchNorm:
    """Train ours on this rank's slice and BatchNormNd on the whole batch; record every mismatch in ``errs``.

    Checks output, input grad, summed weight/bias grads, running stats and num_batches_tracked after each step,
    and that the running buffers are bit-identical across the group. Returns our layer.
    """
    bn_kwargs = bn_kwargs or {}
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref = _bn_class(ndim)(CHANNELS, dtype=ref_dtype, **bn_kwargs)
    _randomize(ref, seed)
    ours = SyncBatchNorm(CHANNELS, process_group=group, dtype=param_dtype, **bn_kwargs)
    ours.load_state_dict(ref.state_dict())
    mine = _span(sizes, rank)
    for step in range(steps):
        x, g = _batch(seed + step, sum(sizes), TAILS[ndim], dtype)
        xr = x.to(ref_dtype, copy=True).requires_grad_()
        yr = ref(xr)
        (yr * g.to(ref_dtype)).sum().backward()
        xl = x[mine].clone()
        if memory_format is not None:
            xl = xl.contiguous(memory_format=memory_format)
        xl.requires_grad_()
        y = ours(xl)
        (y.to(ref_dtype) * g[mine].to(ref_dtype)).sum().backward()
        where = f"{tag} step {step}"
        if y.dtype != dtype or xl.grad.dtype != dtype:
            errs.append(f"{where}: dtypes out {y.dtype} / grad {xl.grad.dtype}, want {dtype}")
        kept = memory_format is None or sizes[rank] == 0
        kept = kept or (
            y.is_contiguous(memory_format=memory_format) and xl.grad.is_contiguous(memory_format=memory_format)
        )
        if not kept:
            errs.append(f"{where}: memory format {memory_format} not preserved")
        _close(errs, f"{where} output", y, yr[mine], atol)
        _close(errs, f"{where} input grad", xl.grad, xr.grad[mine], atol)
        for name, p_ref in ref.named_parameters():
            _close(errs, f"{where} {name} grad", _sum_over_group(getattr(ours, name).grad, group), p_ref.grad, atol)
        ours.zero_grad()
        ref.zero_grad()
        if ours.running_mean is not None:
            _close(errs, f"{where} running_mean", ours.running_mean, ref.running_mean, atol)
            _close(errs, f"{where} running_var", ours.running_var, ref.running_var, atol)
            if not torch.equal(ours.num_batches_tracked, ref.num_batches_tracked):
                errs.append(f"{where}: num_batches_tracked {ours.num_batches_tracked} != {ref.num_batches_tracked}")
            buffers = torch.cat([ours.running_mean, ours.running_var])
            _identical_on_all_ranks(errs, f"{where} running buffers", buffers, group)
    return ours


# --------------------------------------------------------------------------------------------- distributed cases

DIST_CASES: dict[str, Callable[[int, int], None]] = {}


def _dist_case(fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
    DIST_CASES[fn.__name__.removeprefix("_case_")] = fn
    return fn


def _run_cases(rank: int, world_size: int, names: list[str]) -> dict[str, str | None]:
    """Run every named case in this process; a case's failure is recorded, and the next case still runs."""
    results: dict[str, str | None] = {}
    for name in names:
        try:
            {**DIST_CASES, **GROUP_CASES}[name](rank, world_size)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per case in the parent
            results[name] = traceback.format_exc()
        dist.barrier()
    return results


@_dist_case
def _case_shapes_and_batches(rank: int, ws: int) -> None:
    """2D..5D input, equal / uneven / empty-rank / one-sample-per-rank batches, fp64 exactness."""
    errs: list[str] = []
    for kind in ("equal", "uneven", "empty"):
        for ndim in TAILS:
            _compare_with_bn(errs, f"{kind} {ndim}D", SIZES[kind][ws], ndim, rank=rank, seed=ndim)
    _compare_with_bn(errs, "ones 2D", SIZES["ones"][ws], 2, rank=rank)
    _compare_with_bn(errs, "ones 4D", SIZES["ones"][ws], 4, rank=rank)
    assert not errs, "\n".join(errs)


@_dist_case
def _case_fp32_momentum_affine_tracking(rank: int, ws: int) -> None:
    """fp32 over steps; momentum=None (cumulative average); affine=False; no bias; track_running_stats=False."""
    errs: list[str] = []
    sizes = SIZES["uneven"][ws]
    _compare_with_bn(errs, "fp32", sizes, 4, rank=rank, dtype=torch.float32, steps=2, atol=1e-5)
    _compare_with_bn(errs, "momentum None", sizes, 3, rank=rank, steps=3, bn_kwargs={"momentum": None})
    _compare_with_bn(errs, "affine False", sizes, 4, rank=rank, steps=2, bn_kwargs={"affine": False})
    _compare_with_bn(errs, "bias False", sizes, 2, rank=rank, bn_kwargs={"bias": False}, seed=5)
    ours = _compare_with_bn(errs, "no running stats", sizes, 5, rank=rank, bn_kwargs={"track_running_stats": False})
    # Eval without running stats: BatchNorm normalises with the local batch's stats, with no communication.
    ref = nn.BatchNorm3d(CHANNELS, track_running_stats=False, dtype=torch.float64).eval()
    ref.load_state_dict(ours.state_dict())
    ours.eval()
    x = _batch(7, 4, TAILS[5], torch.float64)[0]
    with _count_collectives() as calls:
        y = ours(x)
    if calls or not torch.equal(y, ref(x)):
        errs.append(f"eval without running stats: calls {calls}, equal {torch.equal(y, ref(x))}")
    assert not errs, "\n".join(errs)


@_dist_case
def _case_channels_last_and_low_precision(rank: int, ws: int) -> None:
    """channels_last(_3d) kept in output and input grad; bf16/fp16 with an empty rank accumulate in fp32."""
    errs: list[str] = []
    uneven, empty = SIZES["uneven"][ws], SIZES["empty"][ws]
    _compare_with_bn(errs, "channels_last", uneven, 4, rank=rank, memory_format=torch.channels_last)
    _compare_with_bn(errs, "channels_last_3d", uneven, 5, rank=rank, memory_format=torch.channels_last_3d)
    _compare_with_bn(errs, "fp32 channels_last", empty, 4, rank=rank, dtype=torch.float32, atol=1e-5,
                     memory_format=torch.channels_last)  # fmt: skip
    # Tolerances: bf16 keeps 8 mantissa bits (~4e-3 relative on outputs of size ~3, grads of size ~10).
    _compare_with_bn(errs, "bf16", empty, 4, rank=rank, dtype=torch.bfloat16, steps=2, atol=1e-1)
    _compare_with_bn(errs, "fp16", empty, 3, rank=rank, dtype=torch.float16, atol=2e-2)
    assert not errs, "\n".join(errs)


@_dist_case
def _case_large_offset(rank: int, ws: int) -> None:
    """1e4 + N(0, 1) in fp32: Chan's combine keeps the variance to ~1e-4 (sum of squares would lose it all)."""
    sizes = [300 + 50 * r for r in range(ws)]
    x = torch.randn(sum(sizes), CHANNELS, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1e4
    bn = SyncBatchNorm(CHANNELS, momentum=1.0)  # running stats = this batch's global mean / unbiased var
    bn(x[_span(sizes, rank)].float())
    want_var = x.transpose(0, 1).reshape(CHANNELS, -1).var(dim=1)
    want_mean = x.mean(dim=(0, 2))
    var_err = ((bn.running_var.double() - want_var).abs() / want_var).max().item()
    mean_err = ((bn.running_mean.double() - want_mean).abs() / want_mean).max().item()
    assert var_err < 1e-4 and mean_err < 1e-6, f"relative error var {var_err:.2e} mean {mean_err:.2e}"


@_dist_case
def _case_global_count_zero_and_one(rank: int, ws: int) -> None:
    """Count 0: empty outputs, stats unchanged, backward still runs; count 1: BatchNorm's error on every rank."""
    errs: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        bn = SyncBatchNorm(CHANNELS)
        _randomize(bn, 0)
        before = bn.state_dict()
        x = torch.zeros(0, CHANNELS, 4, dtype=dtype, requires_grad=True)
        with _count_collectives() as calls:
            y = bn(x)
            y.sum().backward()
        if y.shape != x.shape or y.dtype != dtype or x.grad.shape != x.shape:
            errs.append(f"count 0 {dtype}: shapes/dtypes {y.shape} {y.dtype} {x.grad.shape}")
        for key in ("running_mean", "running_var"):
            if not torch.equal(bn.state_dict()[key], before[key]):
                errs.append(f"count 0 {dtype}: {key} changed")
        if int(bn.num_batches_tracked) != 1 or bn.weight.grad.abs().sum() != 0 or torch.isnan(bn.weight.grad).any():
            errs.append(f"count 0 {dtype}: counter {bn.num_batches_tracked}, weight grad {bn.weight.grad}")
        if [c[0] for c in calls] != ["all_gather_single", "all_reduce"]:
            errs.append(f"count 0 {dtype}: collectives {calls}")
    for shape in ((1, CHANNELS), (1, CHANNELS, 1, 1)):
        bn = SyncBatchNorm(CHANNELS)
        x = torch.randn(shape) if rank == ws - 1 else torch.randn(0, *shape[1:])
        try:
            bn(x)
            errs.append(f"count 1 {shape}: no error on rank {rank}")
        except ValueError as err:
            if "Expected more than 1 value per channel when training" not in str(err):
                errs.append(f"count 1 {shape}: wrong message {err}")
        if torch.isnan(bn.running_mean).any() or torch.isnan(bn.running_var).any():
            errs.append(f"count 1 {shape}: NaN in running stats")
    # The group is still in step after the error: a normal call agrees with BatchNorm.
    _compare_with_bn(errs, "after count-1 error", SIZES["uneven"][ws], 2, rank=rank)
    assert not errs, "\n".join(errs)


@_dist_case
def _case_collective_budget(rank: int, ws: int) -> None:
    """Exactly one all-gather of 2C+1 values per layer forward and one all-reduce of 2C backward, empty rank too."""
    errs: list[str] = []
    sizes = SIZES["empty"][ws]
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), SyncBatchNorm(5), nn.ReLU(), nn.Conv2d(5, 4, 1), SyncBatchNorm(4)
    )
    for dtype, stat_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64)):
        model.to(dtype)
        for step in range(2):
            x = _batch(step, sum(sizes), (6, 6), dtype)[0][_span(sizes, rank)].requires_grad_()
            with _count_collectives() as fwd:
                y = model(x)
            with _count_collectives() as bwd:
                y.sum().backward()
            want_fwd = [("all_gather_single", 11, stat_dtype), ("all_gather_single", 9, stat_dtype)]
            want_bwd = [("all_reduce", 8, stat_dtype), ("all_reduce", 10, stat_dtype)]
            if fwd != want_fwd or bwd != want_bwd:
                errs.append(f"{dtype} step {step} rank {rank}: forward {fwd}, backward {bwd}")
    bn = SyncBatchNorm(5)
    x = torch.randn(sizes[rank], 5, 2, dtype=torch.bfloat16, requires_grad=True)
    with _count_collectives() as calls:
        bn(x).float().sum().backward()
    if calls != [("all_gather_single", 11, torch.float32), ("all_reduce", 10, torch.float32)]:
        errs.append(f"bf16: {calls}")
    assert not errs, "\n".join(errs)


@_dist_case
def _case_no_communication_fallbacks(rank: int, ws: int) -> None:
    """Eval mode and groups of size 1: no collective at all, bit-identical to BatchNormNd."""
    errs: list[str] = []
    solo, _ = dist.new_subgroups(group_size=1)
    for ndim in TAILS:
        for mode in ("eval", "size-1 group"):
            ref = _bn_class(ndim)(CHANNELS)
            _randomize(ref, ndim)
            ours = SyncBatchNorm(CHANNELS, process_group=solo if mode != "eval" else None)
            ours.load_state_dict(ref.state_dict())
            ref.train(mode != "eval")
            ours.train(mode != "eval")
            x = _batch(rank + 10 * ndim, 4, TAILS[ndim], torch.float32)[0]
            xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            with _count_collectives() as calls:
                y = ours(xo)
                y.sum().backward()
            yr = ref(xr)
            yr.sum().backward()
            same = [torch.equal(y, yr), torch.equal(xo.grad, xr.grad), torch.equal(ours.weight.grad, ref.weight.grad)]
            same += [torch.equal(ours.running_var, ref.running_var), torch.equal(ours.running_mean, ref.running_mean)]
            if calls or not all(same):
                errs.append(f"{mode} {ndim}D: collectives {calls}, bit-identical {same}")
    assert not errs, "\n".join(errs)


def _small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _images(seed: int, n: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _bn_buffers(model: nn.Module) -> Tensor:
    return torch.cat([b.float().reshape(-1) for name, b in model.named_buffers() if "running" in name])


E2E_SIZES = {2: [[5, 3], [2, 6], [4, 4]], 3: [[4, 1, 3], [3, 0, 5], [2, 4, 2]]}


@_dist_case
def _case_ddp_training_matches_single_process(rank: int, ws: int) -> None:
    """Converted model in DDP (broadcast_buffers=False), uneven/empty batches == one process on the global batch.

    DDP averages gradients over ranks, so each rank's loss is its SUM of per-sample losses * world_size / global
    batch; the average is then the mean over the global batch, which is the single-process loss.
    """
    errs: list[str] = []
    ref = _small_net(0)
    model = DDP(convert_sync_batchnorm(copy.deepcopy(ref)), broadcast_buffers=False)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step, sizes in enumerate(E2E_SIZES[ws]):
        x, target = _images(100 + step, sum(sizes))
        mine = _span(sizes, rank)
        loss = F.cross_entropy(model(x[mine]), target[mine], reduction="sum") * ws / sum(sizes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), target).backward()
        opt_ref.step()
    for (name, p), p_ref in zip(model.module.named_parameters(), ref.parameters(), strict=True):
        _close(errs, f"param {name}", p, p_ref, atol=1e-5)
    _close(errs, "running buffers", _bn_buffers(model.module), _bn_buffers(ref), atol=1e-5)
    _identical_on_all_ranks(errs, "running buffers", _bn_buffers(model.module))
    assert not errs, "\n".join(errs)


@_dist_case
def _case_torch_compile(rank: int, ws: int) -> None:
    """torch.compile: the graph breaks only at the SyncBN layers (their collectives), and trains exactly as eager."""
    import torch._dynamo

    errs: list[str] = []
    eager = convert_sync_batchnorm(_small_net(0))
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager")  # dynamo's graphs, without a C++ build
    layers = sum(isinstance(m, SyncBatchNorm) for m in eager.modules())
    x, target = _images(7, 3 * ws + 1)
    mine = _span([3] * (ws - 1) + [4], rank)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(x[mine])
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    if len(reasons) != layers or not all("disable" in r for r in reasons):
        errs.append(f"graph breaks: want {layers}, one per SyncBN layer; got {reasons}")
    torch._dynamo.reset()
    for step in range(2):
        outs = [net(x[mine]) for net in (eager, compiled)]
        for out in outs:
            F.cross_entropy(out, target[mine]).backward()
        _close(errs, f"step {step} output", outs[1], outs[0], atol=1e-6)
    for (name, p), p_eager in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        _close(errs, f"grad {name}", p.grad, p_eager.grad, atol=1e-6)
    _close(errs, "running buffers", _bn_buffers(compiled), _bn_buffers(eager), atol=1e-6)
    assert not errs, "\n".join(errs)


@_dist_case
def _case_convert_inside_ddp(rank: int, ws: int) -> None:
    """convert_sync_batchnorm on a model already wrapped in DDP replaces the layers in place, same Parameters."""
    errs: list[str] = []
    ref = _small_net(1)
    ddp = DDP(copy.deepcopy(ref))
    params_before = list(ddp.parameters())
    converted = convert_sync_batchnorm(ddp)
    n_sync = sum(isinstance(m, SyncBatchNorm) for m in ddp.modules())
    if (
        converted is not ddp
        or n_sync != 2
        or any(a is not b for a, b in zip(ddp.parameters(), params_before, strict=True))
    ):
        errs.append(f"conversion inside DDP: same wrapper {converted is ddp}, {n_sync} SyncBatchNorm layers")
    sizes = SIZES["uneven"][ws]
    x, target = _images(7, sum(sizes))
    out = ddp(x[_span(sizes, rank)])
    (F.cross_entropy(out, target[_span(sizes, rank)], reduction="sum") * ws / sum(sizes)).backward()
    out_ref = ref(x)
    F.cross_entropy(out_ref, target).backward()
    _close(errs, "output", out, out_ref[_span(sizes, rank)], atol=1e-5)
    for p, p_ref in zip(ddp.module.parameters(), ref.parameters(), strict=True):
        _close(errs, "DDP grad", p.grad, p_ref.grad, atol=1e-5)
    assert not errs, "\n".join(errs)


@_dist_case
def _case_ghost_matches_ddp_local_bn(rank: int, ws: int) -> None:
    """GhostBatchNorm(k splits) in one process == k ranks of DDP with local BatchNorm (outputs, grads, buffers).

    Per-rank loss is the mean over its chunk and DDP averages grads over ranks, i.e. the mean over the whole batch:
    the ghost model's loss.
    """
    errs: list[str] = []
    init = _small_net(2)
    ddp = DDP(copy.deepcopy(init))  # broadcast_buffers=True: every rank's running stats follow rank 0
    ghost = convert_ghost_batchnorm(copy.deepcopy(init), ws)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ghost = torch.optim.SGD(ghost.parameters(), lr=0.1)
    chunk = 4
    mine = slice(rank * chunk, (rank + 1) * chunk)
    for step in range(2):
        x, target = _images(200 + step, ws * chunk)
        out = ddp(x[mine])
        opt_ddp.zero_grad()
        F.cross_entropy(out, target[mine]).backward()
        out_ghost = ghost(x)
        opt_ghost.zero_grad()
        F.cross_entropy(out_ghost, target).backward()
        _close(errs, f"step {step} output", out_ghost[mine], out, atol=1e-6)
        for p, p_ref in zip(ghost.parameters(), ddp.module.parameters(), strict=True):
            _close(errs, f"step {step} grad", p.grad, p_ref.grad, atol=1e-6)
        opt_ddp.step()
        opt_ghost.step()
    rank0_buffers = _bn_buffers(ddp.module)
    dist.broadcast(rank0_buffers, src=0)
    _close(errs, "running stats (rank 0's)", _bn_buffers(ghost), rank0_buffers, atol=1e-6)
    counters = [int(m.num_batches_tracked) for m in ghost.modules() if isinstance(m, GhostBatchNorm)]
    if counters != [2, 2]:
        errs.append(f"num_batches_tracked {counters}")
    assert not errs, "\n".join(errs)


def _rank_buffers(r: int) -> tuple[Tensor, Tensor, int]:
    """Rank ``r``'s made-up running stats for 3 + 2 channels (means far from 0, to see the spread term)."""
    gen = torch.Generator().manual_seed(50 + r)
    return torch.randn(5, generator=gen) * 3 + 10, torch.rand(5, generator=gen) + 0.5, 3 + r


def _set_buffers(model: nn.Module, r: int) -> None:
    mean, var, count = _rank_buffers(r)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m, part in zip(bns, (slice(0, 3), slice(3, 5)), strict=True):
            m.running_mean.copy_(mean[part])
            m.running_var.copy_(var[part])
            m.num_batches_tracked.fill_(count)


@_dist_case
def _case_sync_bn_buffers(rank: int, ws: int) -> None:
    """broadcast: rank 0's; reduce: mean of means, mean of vars + spread of means; one collective per call."""
    errs: list[str] = []
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm2d(2))
    everyone = [_rank_buffers(r) for r in range(ws)]
    pooled_mean = sum(m.double() for m, _, _ in everyone) / ws
    spread = sum((m.double() - pooled_mean) ** 2 for m, _, _ in everyone) / ws
    pooled_var = sum(v.double() for _, v, _ in everyone) / ws + spread
    want = {
        "broadcast": (everyone[0][0], everyone[0][1]),
        "reduce": (pooled_mean, pooled_var),
    }
    for policy, (mean, var) in want.items():
        _set_buffers(model, rank)
        with _count_collectives() as calls:
            sync_bn_buffers(model, policy=policy)
        if len(calls) != 1:
            errs.append(f"{policy}: {len(calls)} collectives {calls}")
        _close(errs, f"{policy} means", torch.cat([model[0].running_mean, model[2].running_mean]), mean, 1e-5)
        _close(errs, f"{policy} vars", torch.cat([model[0].running_var, model[2].running_var]), var, 1e-5)
        if [int(model[0].num_batches_tracked), int(model[2].num_batches_tracked)] != [3, 3]:
            errs.append(f"{policy}: num_batches_tracked is not rank 0's")
    assert not errs, "\n".join(errs)


def _case_sync_groups(rank: int, ws: int) -> None:
    """On 4 ranks, dist.new_subgroups(2): each pair synchronises within itself only; non-members stay local."""
    errs: list[str] = []
    pair, _ = dist.new_subgroups(group_size=2)
    pair_id, pair_rank = divmod(rank, 2)
    _compare_with_bn(errs, f"pair {pair_id}", [5, 2], 4, rank=pair_rank, group=pair, seed=10 + pair_id, steps=2)
    layer = convert_sync_batchnorm(nn.BatchNorm1d(CHANNELS), process_group=pair)
    if layer.process_group is not pair:
        errs.append("convert_sync_batchnorm did not set process_group")
    first_two = dist.new_group([0, 1])
    if rank < 2:
        _compare_with_bn(errs, "group [0, 1]", [3, 4], 3, rank=rank, group=first_two, seed=20)
    else:  # not a member: plain local BatchNorm, no communication
        ref, ours = nn.BatchNorm1d(CHANNELS), SyncBatchNorm(CHANNELS, process_group=first_two)
        x = _batch(rank, 6, (4,), torch.float32)[0]
        with _count_collectives() as calls:
            y = ours(x)
        if calls or not torch.equal(y, ref(x)) or not torch.equal(ours.running_var, ref.running_var):
            errs.append(f"non-member rank {rank}: collectives {calls}, bit-identical {torch.equal(y, ref(x))}")
    assert not errs, "\n".join(errs)


GROUP_CASES = {"sync_groups": _case_sync_groups}  # needs 4 ranks: run in its own group


@functools.cache
def _results(world_size: int) -> list[dict[str, str | None]] | AssertionError:
    """All cases of one world size from one spawned group, computed once and shared by the pytest items."""
    cases = GROUP_CASES if world_size == 4 else DIST_CASES
    try:
        return run_distributed(_run_cases, world_size, list(cases), timeout_s=60)
    except AssertionError as err:  # a hang or crash: every case of this world size reports it
        return err


def _assert_case_passed(world_size: int, case: str) -> None:
    results = _results(world_size)
    if isinstance(results, AssertionError):
        raise results
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(results) if res[case] is not None]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", sorted(DIST_CASES))
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_case(world_size: int, case: str) -> None:
    _assert_case_passed(world_size, case)


def test_sync_groups_on_four_ranks() -> None:
    _assert_case_passed(4, "sync_groups")


# --------------------------------------------------------------------------------------------- single process


@pytest.mark.parametrize("ndim", sorted(TAILS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_process_group_is_batchnorm_bit_for_bit(ndim: int, mode: str) -> None:
    assert not dist.is_initialized()
    ref = _bn_class(ndim)(CHANNELS)
    _randomize(ref, ndim)
    ours = SyncBatchNorm(CHANNELS)
    ours.load_state_dict(ref.state_dict())
    ref.train(mode == "train")
    ours.train(mode == "train")
    x, g = _batch(ndim, 5, TAILS[ndim], torch.float32)
    if ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    (yr * g).sum().backward()
    (yo * g).sum().backward()
    assert torch.equal(yo, yr) and torch.equal(xo.grad, xr.grad)
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_input_must_be_at_least_2d() -> None:
    for layer in (SyncBatchNorm(3), GhostBatchNorm(3, virtual_splits=2), AnyDimBatchNorm(3)):
        with pytest.raises(ValueError, match="expected at least 2D input"):
            layer(torch.randn(3))


def _bn_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4, momentum=None))
    )
    net.add_module("bn3d", nn.BatchNorm3d(2, affine=False))
    net[1].weight.requires_grad_(False)
    net[2][1].eval()
    _randomize(net[1], 0)
    return net


def _tensors(model: nn.Module) -> list[Tensor]:
    return list(model.parameters()) + list(model.buffers())


def test_convert_keeps_tensors_flags_and_round_trips() -> None:
    net = _bn_net()
    tensors, flags = _tensors(net), [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    synced = convert_sync_batchnorm(net)
    layers = [synced[1], synced[2][1], synced.bn3d]
    assert synced is net and all(type(m) is SyncBatchNorm for m in layers)
    assert [m._orig_bn_class for m in layers] == [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d]
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
    _randomize(bn, 1)
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
    ours = convert_sync_batchnorm(torch_version, impl="ours")  # already synchronised: left alone
    assert type(ours[1]) is nn.SyncBatchNorm
    assert type(revert_sync_batchnorm(ours)[1]) is nn.BatchNorm2d
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
    assert type(SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3))) is SyncBatchNorm


def test_root_module_conversion_returns_new_module_with_same_tensors() -> None:
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3).eval()
    _randomize(bn, 2)
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
    _randomize(ref, 3)
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


def test_sync_bn_buffers_without_group_is_a_no_op() -> None:
    net = _bn_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    sync_bn_buffers(net, policy="reduce")
    sync_bn_buffers(net, policy="broadcast")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="broadcast, reduce"):
        sync_bn_buffers(net, policy="average")
