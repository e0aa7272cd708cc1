"""SyncBatchNorm inside real models: DDP training equals one process on the global batch, torch.compile, converting
a model already in DDP, ghost BatchNorm against DDP with local BatchNorm, and running-stat consistency without SyncBN.

Each world size's cases run in one spawned gloo group (see ``tests/helpers/syncbn.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.bn import GhostBatchNorm, SyncBatchNorm, convert_ghost_batchnorm, convert_sync_batchnorm, sync_bn_buffers
from engine.runtime.comm_debug import count_comm
from tests.helpers.syncbn import (
    SIZES,
    assert_case_passed,
    bn_buffers,
    case_id,
    close,
    identical_on_all_ranks,
    images,
    small_net,
    span,
    with_paths,
)

E2E_SIZES = {2: [[5, 3], [2, 6], [4, 4]], 3: [[4, 1, 3], [3, 0, 5], [2, 4, 2]]}



def ddp_training_matches_single_process(rank: int, ws: int, path: str) -> None:
    """Converted model in DDP (broadcast_buffers=False), uneven/empty batches == one process on the global batch.

    DDP averages gradients over ranks, so each rank's loss is its SUM of per-sample losses * world_size / global
    batch; the average is then the mean over the global batch, which is the single-process loss.
    """
    errs: list[str] = []
    ref = small_net(0)
    model = DDP(convert_sync_batchnorm(copy.deepcopy(ref), collective=path), broadcast_buffers=False)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step, sizes in enumerate(E2E_SIZES[ws]):
        x, target = images(100 + step, sum(sizes))
        mine = span(sizes, rank)
        loss = F.cross_entropy(model(x[mine]), target[mine], reduction="sum") * ws / sum(sizes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), target).backward()
        opt_ref.step()
    for (name, p), p_ref in zip(model.module.named_parameters(), ref.parameters(), strict=True):
        close(errs, f"param {name}", p, p_ref, atol=1e-5)
    close(errs, "running buffers", bn_buffers(model.module), bn_buffers(ref), atol=1e-5)
    identical_on_all_ranks(errs, "running buffers", bn_buffers(model.module))
    assert not errs, "\n".join(errs)


def torch_compile(rank: int, ws: int, path: str) -> None:
    """torch.compile(fullgraph=True): no graph break (functional collectives, no host read), and the compiled model
    trains as eager over several optimizer steps, uneven batches included."""
    import torch._dynamo

    errs: list[str] = []
    eager = convert_sync_batchnorm(small_net(0), collective=path)
    x, target = images(7, 3 * ws + 1)
    mine = span([3] * (ws - 1) + [4], rank)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(x[mine])
    if explained.graph_break_count != 0 or explained.graph_count != 1:
        reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
        errs.append(f"want one graph and no break; got {explained.graph_count} graphs, breaks {reasons}")
    torch._dynamo.reset()
    # dynamo's graphs with aot_eager: traced whole, without a C++ toolchain
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    nets = (eager, compiled)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for net in nets]
    for step in range(3):
        outs = [net(x[mine]) for net in nets]
        for out, opt in zip(outs, optimizers, strict=True):
            opt.zero_grad()
            F.cross_entropy(out, target[mine]).backward()
            opt.step()
        close(errs, f"step {step} output", outs[1], outs[0], atol=1e-5)
    for (name, p), p_eager in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        close(errs, f"param {name}", p, p_eager, atol=1e-5)
    close(errs, "running buffers", bn_buffers(compiled), bn_buffers(eager), atol=1e-5)
    assert not errs, "\n".join(errs)


def convert_inside_ddp(rank: int, ws: int, path: str) -> None:
    """convert_sync_batchnorm on a model already wrapped in DDP replaces the layers in place, same Parameters."""
    errs: list[str] = []
    ref = small_net(1)
    ddp = DDP(copy.deepcopy(ref))
    params_before = list(ddp.parameters())
    converted = convert_sync_batchnorm(ddp, collective=path)
    n_sync = sum(isinstance(m, SyncBatchNorm) for m in ddp.modules())
    if (
        converted is not ddp
        or n_sync != 2
        or any(a is not b for a, b in zip(ddp.parameters(), params_before, strict=True))
    ):
        errs.append(f"conversion inside DDP: same wrapper {converted is ddp}, {n_sync} SyncBatchNorm layers")
    sizes = SIZES["uneven"][ws]
    x, target = images(7, sum(sizes))
    out = ddp(x[span(sizes, rank)])
    (F.cross_entropy(out, target[span(sizes, rank)], reduction="sum") * ws / sum(sizes)).backward()
    out_ref = ref(x)
    F.cross_entropy(out_ref, target).backward()
    close(errs, "output", out, out_ref[span(sizes, rank)], atol=1e-5)
    for p, p_ref in zip(ddp.module.parameters(), ref.parameters(), strict=True):
        close(errs, "DDP grad", p.grad, p_ref.grad, atol=1e-5)
    assert not errs, "\n".join(errs)


def ghost_matches_ddp_local_bn(rank: int, ws: int) -> None:
    """GhostBatchNorm(k splits) in one process == k ranks of DDP with local BatchNorm (outputs, grads, buffers).

    Per-rank loss is the mean over its chunk and DDP averages grads over ranks, i.e. the mean over the whole batch:
    the ghost model's loss.
    """
    errs: list[str] = []
    init = small_net(2)
    ddp = DDP(copy.deepcopy(init))  # broadcast_buffers=True: every rank's running stats follow rank 0
    ghost = convert_ghost_batchnorm(copy.deepcopy(init), ws)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ghost = torch.optim.SGD(ghost.parameters(), lr=0.1)
    chunk = 4
    mine = slice(rank * chunk, (rank + 1) * chunk)
    for step in range(2):
        x, target = images(200 + step, ws * chunk)
        out = ddp(x[mine])
        opt_ddp.zero_grad()
        F.cross_entropy(out, target[mine]).backward()
        out_ghost = ghost(x)
        opt_ghost.zero_grad()
        F.cross_entropy(out_ghost, target).backward()
        close(errs, f"step {step} output", out_ghost[mine], out, atol=1e-6)
        for p, p_ref in zip(ghost.parameters(), ddp.module.parameters(), strict=True):
            close(errs, f"step {step} grad", p.grad, p_ref.grad, atol=1e-6)
        opt_ddp.step()
        opt_ghost.step()
    rank0_buffers = bn_buffers(ddp.module)
    dist.broadcast(rank0_buffers, src=0)
    close(errs, "running stats (rank 0's)", bn_buffers(ghost), rank0_buffers, atol=1e-6)
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


def buffer_policies_make_running_stats_agree(rank: int, ws: int) -> None:
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
        with count_comm() as comm:
            sync_bn_buffers(model, policy=policy)
        if len(comm.collectives) != 1:
            errs.append(f"{policy}: {len(comm.collectives)} collectives {comm.collectives}")
        close(errs, f"{policy} means", torch.cat([model[0].running_mean, model[2].running_mean]), mean, 1e-5)
        close(errs, f"{policy} vars", torch.cat([model[0].running_var, model[2].running_var]), var, 1e-5)
        if [int(model[0].num_batches_tracked), int(model[2].num_batches_tracked)] != [3, 3]:
            errs.append(f"{policy}: num_batches_tracked is not rank 0's")
    assert not errs, "\n".join(errs)


CASES = (
    *with_paths(ddp_training_matches_single_process, torch_compile, convert_inside_ddp),
    (ghost_matches_ddp_local_bn, None),
    (buffer_policies_make_running_stats_agree, None),
)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_case(world_size: int, case) -> None:
    assert_case_passed(CASES, world_size, case)


def test_sync_bn_buffers_without_group_is_a_no_op() -> None:
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm2d(2))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    sync_bn_buffers(net, policy="reduce")
    sync_bn_buffers(net, policy="broadcast")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="broadcast, reduce"):
        sync_bn_buffers(net, policy="average")
