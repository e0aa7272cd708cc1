"""SyncBatchNorm, one layer, against BatchNorm on the concatenated batch: exactness, edge cases, collective budget.

The distributed cases run at world sizes 2 and 3 (and groups at 4), each world size in one spawned gloo group
(see ``tests/helpers/syncbn.py``); without a process group the layer must be BatchNorm bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine.bn import (
    AnyDimBatchNorm,
    GhostBatchNorm,
    SyncBatchNorm,
    check_values_per_channel,
    choose_collective,
    convert_sync_batchnorm,
)
from engine.runtime.comm_debug import count_comm
from engine.runtime.spawn import spawn
from tests.helpers.syncbn import (
    CHANNELS,
    PATHS,
    SIZES,
    TAILS,
    assert_case_passed,
    batch,
    bn_class,
    case_id,
    collectives,
    compare_with_bn,
    randomize,
    span,
    with_paths,
)


def shapes_and_batches(rank: int, ws: int, path: str) -> None:
    """2D..5D input, equal / uneven / empty-rank / one-sample-per-rank batches, fp64 exactness."""
    errs: list[str] = []
    for kind in ("equal", "uneven", "empty"):
        for ndim in TAILS:
            compare_with_bn(errs, f"{kind} {ndim}D", SIZES[kind][ws], ndim, rank=rank, seed=ndim, collective=path)
    compare_with_bn(errs, "ones 2D", SIZES["ones"][ws], 2, rank=rank, collective=path)
    compare_with_bn(errs, "ones 4D", SIZES["ones"][ws], 4, rank=rank, collective=path)
    assert not errs, "\n".join(errs)


def fp32_momentum_affine_tracking(rank: int, ws: int, path: str) -> None:
    """fp32 over steps; momentum=None (cumulative average); affine=False; no bias; track_running_stats=False."""
    errs: list[str] = []
    sizes = SIZES["uneven"][ws]
    compare_with_bn(errs, "fp32", sizes, 4, rank=rank, dtype=torch.float32, steps=2, atol=1e-5, collective=path)
    compare_with_bn(errs, "momentum None", sizes, 3, rank=rank, steps=3, bn_kwargs={"momentum": None}, collective=path)
    compare_with_bn(errs, "affine False", sizes, 4, rank=rank, steps=2, bn_kwargs={"affine": False}, collective=path)
    compare_with_bn(errs, "bias False", sizes, 2, rank=rank, bn_kwargs={"bias": False}, seed=5, collective=path)
    ours = compare_with_bn(errs, "no running stats", sizes, 5, rank=rank, bn_kwargs={"track_running_stats": False},
                           collective=path)
    # Eval without running stats: BatchNorm normalises with the local batch's stats, with no communication.
    ref = nn.BatchNorm3d(CHANNELS, track_running_stats=False, dtype=torch.float64).eval()
    ref.load_state_dict(ours.state_dict())
    ours.eval()
    x = batch(7, 4, TAILS[5], torch.float64)[0]
    with count_comm() as comm:
        y = ours(x)
    if comm.collectives or not torch.equal(y, ref(x)):
        errs.append(f"eval without running stats: calls {comm.collectives}, equal {torch.equal(y, ref(x))}")
    assert not errs, "\n".join(errs)


def channels_last_and_low_precision(rank: int, ws: int, path: str) -> None:
    """channels_last(_3d) kept in output and input grad; bf16/fp16 with an empty rank accumulate in fp32."""
    errs: list[str] = []
    uneven, empty = SIZES["uneven"][ws], SIZES["empty"][ws]
    compare_with_bn(errs, "channels_last", uneven, 4, rank=rank, memory_format=torch.channels_last, collective=path)
    compare_with_bn(errs, "channels_last_3d", uneven, 5, rank=rank, memory_format=torch.channels_last_3d, collective=path)
    compare_with_bn(errs, "fp32 channels_last", empty, 4, rank=rank, dtype=torch.float32, atol=1e-5,
                     memory_format=torch.channels_last, collective=path)  # fmt: skip
    # Tolerances: bf16 keeps 8 mantissa bits (~4e-3 relative on outputs of size ~3, grads of size ~10).
    compare_with_bn(errs, "bf16", empty, 4, rank=rank, dtype=torch.bfloat16, steps=2, atol=1e-1, collective=path)
    compare_with_bn(errs, "fp16", empty, 3, rank=rank, dtype=torch.float16, atol=2e-2, collective=path)
    assert not errs, "\n".join(errs)


def large_offset(rank: int, ws: int, path: str) -> None:
    """1e4 + N(0, 1) in fp32: both combines keep the variance to ~1e-4 (a plain sum of squares would lose it all)."""
    sizes = [300 + 50 * r for r in range(ws)]
    x = torch.randn(sum(sizes), CHANNELS, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1e4
    bn = SyncBatchNorm(CHANNELS, momentum=1.0, collective=path)  # running stats = this batch's global mean / var
    bn(x[span(sizes, rank)].float())
    want_var = x.transpose(0, 1).reshape(CHANNELS, -1).var(dim=1)
    want_mean = x.mean(dim=(0, 2))
    var_err = ((bn.running_var.double() - want_var).abs() / want_var).max().item()
    mean_err = ((bn.running_mean.double() - want_mean).abs() / want_mean).max().item()
    assert var_err < 1e-4 and mean_err < 1e-6, f"relative error var {var_err:.2e} mean {mean_err:.2e}"


def global_count_zero_and_one(rank: int, ws: int, path: str) -> None:
    """Count 0: empty outputs, stats unchanged, backward still runs. Count 1: no NaN anywhere, stats unchanged,
    and BatchNorm's error on every rank from check_values_per_channel (the layer reads nothing on the host)."""
    errs: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        bn = SyncBatchNorm(CHANNELS, collective=path)
        randomize(bn, 0)
        before = bn.state_dict()
        x = torch.zeros(0, CHANNELS, 4, dtype=dtype, requires_grad=True)
        with count_comm() as comm:
            y = bn(x)
            y.sum().backward()
        if y.shape != x.shape or y.dtype != dtype or x.grad.shape != x.shape:
            errs.append(f"count 0 {dtype}: shapes/dtypes {y.shape} {y.dtype} {x.grad.shape}")
        for key in ("running_mean", "running_var"):
            if not torch.equal(bn.state_dict()[key], before[key]):
                errs.append(f"count 0 {dtype}: {key} changed")
        if int(bn.num_batches_tracked) != 1 or bn.weight.grad.abs().sum() != 0 or torch.isnan(bn.weight.grad).any():
            errs.append(f"count 0 {dtype}: counter {bn.num_batches_tracked}, weight grad {bn.weight.grad}")
        if [c.op for c in comm.collectives] != [path, "all_reduce"]:
            errs.append(f"count 0 {dtype}: collectives {collectives(comm)}")
    for shape in ((1, CHANNELS), (1, CHANNELS, 1, 1)):
        bn = SyncBatchNorm(CHANNELS, collective=path)
        randomize(bn, 1)
        before = bn.state_dict()
        x = (torch.randn(shape) if rank == ws - 1 else torch.randn(0, *shape[1:])).requires_grad_()
        y = bn(x)
        y.sum().backward()
        finite = [t.isfinite().all() for t in (y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)]
        if not all(finite):
            errs.append(f"count 1 {shape}: NaN or inf in outputs, grads or running stats: {finite}")
        if not (torch.equal(bn.running_mean, before["running_mean"]) and torch.equal(bn.running_var, before["running_var"])):
            errs.append(f"count 1 {shape}: running stats changed")
        try:
            check_values_per_channel(nn.Sequential(bn))
            errs.append(f"count 1 {shape}: no error on rank {rank}")
        except ValueError as err:
            if "Expected more than 1 value per channel when training" not in str(err):
                errs.append(f"count 1 {shape}: wrong message {err}")
        check_values_per_channel(nn.Sequential(bn))  # reported once, then clear
    # The group is still in step after the error: a normal call agrees with BatchNorm.
    compare_with_bn(errs, "after count-1 error", SIZES["uneven"][ws], 2, rank=rank, collective=path)
    assert not errs, "\n".join(errs)


def collective_budget(rank: int, ws: int, path: str) -> None:
    """Per layer exactly one collective of 2C+1 values forward (an all-gather in the statistics dtype, or an
    all-reduce in fp64) and one all-reduce of 2C backward, empty rank too; no host read in either pass."""
    errs: list[str] = []
    sizes = SIZES["empty"][ws]
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), SyncBatchNorm(5, collective=path), nn.ReLU(),
                          nn.Conv2d(5, 4, 1), SyncBatchNorm(4, collective=path))  # fmt: skip
    for dtype, stat_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64)):
        model.to(dtype)
        sent_dtype = torch.float64 if path == "all_reduce" else stat_dtype
        for step in range(2):
            x = batch(step, sum(sizes), (6, 6), dtype)[0][span(sizes, rank)].requires_grad_()
            with count_comm() as fwd:
                y = model(x)
            with count_comm() as bwd:
                y.sum().backward()
            want_fwd = [(path, 11, sent_dtype), (path, 9, sent_dtype)]
            want_bwd = [("all_reduce", 8, stat_dtype), ("all_reduce", 10, stat_dtype)]
            if collectives(fwd) != want_fwd or collectives(bwd) != want_bwd:
                errs.append(f"{dtype} step {step} rank {rank}: forward {collectives(fwd)}, backward {collectives(bwd)}")
            if fwd.host_reads or bwd.host_reads:
                errs.append(f"{dtype} step {step}: host reads forward {fwd.host_reads}, backward {bwd.host_reads}")
    bn = SyncBatchNorm(5, collective=path)
    x = torch.randn(sizes[rank], 5, 2, dtype=torch.bfloat16, requires_grad=True)
    with count_comm() as comm:
        bn(x).float().sum().backward()
    want = [(path, 11, torch.float64 if path == "all_reduce" else torch.float32), ("all_reduce", 10, torch.float32)]
    if collectives(comm) != want or comm.host_reads:
        errs.append(f"bf16: {collectives(comm)}, host reads {comm.host_reads}")
    assert not errs, "\n".join(errs)


def auto_picks_all_reduce_from_four_ranks(rank: int, ws: int) -> None:
    """collective="auto": the all-gather below 4 ranks, the all-reduce from 4 up; the same results either way."""
    x = batch(3, 4 * ws, (3,), torch.float64)[0][4 * rank : 4 * rank + 4]
    layers = {name: SyncBatchNorm(CHANNELS, collective=name, dtype=torch.float64) for name in ("auto", *PATHS)}
    outs, used = {}, {}
    for name, layer in layers.items():
        with count_comm() as comm:
            outs[name] = layer(x)
        used[name] = comm.collectives[0].op
    want = "all_reduce" if ws >= 4 else "all_gather"
    assert used["auto"] == want == choose_collective("auto", ws), f"auto used {used['auto']} at {ws} ranks"
    assert torch.equal(outs["auto"], outs[want]), "auto differs from the path it chose"
    assert torch.allclose(outs["all_gather"], outs["all_reduce"], atol=1e-12)


def no_communication_fallbacks(rank: int, ws: int) -> None:
    """Eval mode and groups of size 1: no collective at all, bit-identical to BatchNormNd."""
    errs: list[str] = []
    solo, _ = dist.new_subgroups(group_size=1)
    for ndim in TAILS:
        for mode in ("eval", "size-1 group"):
            ref = bn_class(ndim)(CHANNELS)
            randomize(ref, ndim)
            ours = SyncBatchNorm(CHANNELS, process_group=solo if mode != "eval" else None)
            ours.load_state_dict(ref.state_dict())
            ref.train(mode != "eval")
            ours.train(mode != "eval")
            x = batch(rank + 10 * ndim, 4, TAILS[ndim], torch.float32)[0]
            xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            with count_comm() as comm:
                y = ours(xo)
                y.sum().backward()
            yr = ref(xr)
            yr.sum().backward()
            same = [torch.equal(y, yr), torch.equal(xo.grad, xr.grad), torch.equal(ours.weight.grad, ref.weight.grad)]
            same += [torch.equal(ours.running_var, ref.running_var), torch.equal(ours.running_mean, ref.running_mean)]
            if comm.collectives or comm.host_reads or not all(same):
                errs.append(f"{mode} {ndim}D: collectives {comm.collectives}, bit-identical {same}")
    assert not errs, "\n".join(errs)


CASES = (
    *with_paths(
        shapes_and_batches,
        fp32_momentum_affine_tracking,
        channels_last_and_low_precision,
        large_offset,
        global_count_zero_and_one,
        collective_budget,
    ),
    (no_communication_fallbacks, None),
    (auto_picks_all_reduce_from_four_ranks, None),
)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_distributed_case(world_size: int, case) -> None:
    assert_case_passed(CASES_AT[world_size], world_size, case)


def sync_groups(rank: int, ws: int, path: str) -> None:
    """On 4 ranks, dist.new_subgroups(2): each pair synchronises within itself only; non-members stay local."""
    errs: list[str] = []
    pair, _ = dist.new_subgroups(group_size=2)
    pair_id, pair_rank = divmod(rank, 2)
    compare_with_bn(errs, f"pair {pair_id}", [5, 2], 4, rank=pair_rank, group=pair, seed=10 + pair_id, steps=2, collective=path)
    layer = convert_sync_batchnorm(nn.BatchNorm1d(CHANNELS), process_group=pair, collective=path)
    if layer.process_group is not pair or layer.collective != path:
        errs.append("convert_sync_batchnorm did not set process_group and collective")
    first_two = dist.new_group([0, 1])
    if rank < 2:
        compare_with_bn(errs, "group [0, 1]", [3, 4], 3, rank=rank, group=first_two, seed=20, collective=path)
    else:  # not a member: plain local BatchNorm, no communication
        ref, ours = nn.BatchNorm1d(CHANNELS), SyncBatchNorm(CHANNELS, process_group=first_two, collective=path)
        x = batch(rank, 6, (4,), torch.float32)[0]
        with count_comm() as comm:
            y = ours(x)
        if comm.collectives or not torch.equal(y, ref(x)) or not torch.equal(ours.running_var, ref.running_var):
            errs.append(f"non-member rank {rank}: collectives {comm.collectives}, same {torch.equal(y, ref(x))}")
    assert not errs, "\n".join(errs)


CASES_AT = {2: CASES, 3: CASES, 4: (*CASES, *with_paths(sync_groups))}  # one spawned group per world size


@pytest.mark.parametrize("case", with_paths(sync_groups), ids=case_id)
def test_sync_groups_on_four_ranks(case) -> None:
    assert_case_passed(CASES_AT[4], 4, case)


# --------------------------------------------------------------------------------------------- single process


@pytest.mark.parametrize("ndim", sorted(TAILS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_process_group_is_batchnorm_bit_for_bit(ndim: int, mode: str) -> None:
    assert not dist.is_initialized()
    ref = bn_class(ndim)(CHANNELS)
    randomize(ref, ndim)
    ours = SyncBatchNorm(CHANNELS)
    ours.load_state_dict(ref.state_dict())
    ref.train(mode == "train")
    ours.train(mode == "train")
    x, g = batch(ndim, 5, TAILS[ndim], torch.float32)
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


# --------------------------------------------------------------------------------------------- bytes per rank


def _received_bytes(rank: int, ws: int) -> dict[tuple[int, str], tuple[int, int]]:
    """Bytes of other ranks' data one layer's forward and backward bring to this rank, in groups of 2, 4 and 8."""
    out = {}
    for size in (2, 4, 8):
        group, _ = dist.new_subgroups(group_size=size)
        for path in PATHS:
            layer = SyncBatchNorm(16, process_group=group, collective=path)
            x = torch.randn(3, 16, 2, requires_grad=True)
            with count_comm() as fwd:
                y = layer(x)
            with count_comm() as bwd:
                y.sum().backward()
            out[(size, path)] = (sum(c.received_bytes for c in fwd.collectives),
                                 sum(c.received_bytes for c in bwd.collectives))  # fmt: skip
    return out


@pytest.mark.slow
def test_bytes_per_layer_stay_constant_on_all_reduce_and_grow_on_all_gather() -> None:
    per_rank = spawn(_received_bytes, 8, timeout_s=120)
    assert all(r == per_rank[0] for r in per_rank)
    got = per_rank[0]
    values = 2 * 16 + 1  # count, mean and M2 of 16 channels
    for size in (2, 4, 8):
        assert got[(size, "all_reduce")] == (values * 8, 2 * 16 * 4)  # fp64 sums forward, fp32 backward: any W
        assert got[(size, "all_gather")] == ((size - 1) * values * 4, 2 * 16 * 4)  # every other rank's moments
