"""PreciseBN (``engine.bn.recompute_bn_stats``): population statistics of every BatchNorm, exact and the same at
any world size, against an independent fp64 reference (one process, plain BatchNorm, every layer input kept)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from engine.bn import convert_sync_batchnorm, recompute_bn_stats
from engine.comm_debug import count_comm
from engine.launch import spawn
from tests.helpers.jobs import killed_and_resumed

GLOBAL_BATCH, STEPS = 12, 3  # 12 divides over 1, 2 and 3 ranks


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                         nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(5 * 4 * 4)).double()


def _global_batches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 3 for _ in range(STEPS)]


def _buffers(model: nn.Module) -> Tensor:
    return torch.cat([b.reshape(-1) for n, b in model.named_buffers() if "running" in n])


def _reference(global_batches: list[Tensor]) -> Tensor:
    """Training-mode passes of plain BatchNorm over each global batch; each layer's inputs pooled, var(unbiased)."""
    model = _net().train()
    seen: dict[nn.Module, list[Tensor]] = {}
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, i: seen.setdefault(m, []).append(i[0].transpose(0, 1)
                                                                                   .reshape(i[0].size(1), -1)))
    with torch.no_grad():
        for x in global_batches:
            model(x)
    for layer in layers:
        values = torch.cat(seen[layer], dim=1)
        layer.running_mean.copy_(values.mean(1))
        layer.running_var.copy_(values.var(1))
    return _buffers(model)


def _precise_on_ranks(rank: int, world: int, shard_batches: int | None) -> tuple[list[float], int, list[str]]:
    model = convert_sync_batchnorm(_net())
    per_rank = GLOBAL_BATCH // world
    batches = [x[rank * per_rank : (rank + 1) * per_rank] for x in _global_batches()]
    if shard_batches is not None:  # uneven shards: rank r holds only its first shard_batches[r] batches
        batches = batches[: (STEPS if rank == 0 else 1)]
    with count_comm() as comm:
        used = recompute_bn_stats(model, ((x, 0) for x in batches), num_samples=10**6)
    return _buffers(model).tolist(), used, [c.op for c in comm.collectives]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_precise_bn_is_the_population_statistics_at_any_world_size(world: int) -> None:
    want = _reference(_global_batches())
    results = spawn(_precise_on_ranks, world, None)
    for buffers, used, _ in results:
        assert used == GLOBAL_BATCH * STEPS
        assert torch.allclose(torch.tensor(buffers, dtype=torch.float64), want, rtol=0, atol=1e-9)
    assert all(r[0] == results[0][0] for r in results)  # bit-identical on every rank


def test_uneven_shards_run_the_same_collectives_on_every_rank() -> None:
    """Rank 1 runs out after one batch and feeds empty ones: both ranks issue the same collectives, and the result
    is the population statistics of exactly the batches that existed, grouped as they were."""
    results = spawn(_precise_on_ranks, 2, 1)
    full = _global_batches()
    grouped = [full[0]] + [x[:6] for x in full[1:]]  # step 0: both halves; later steps: rank 0's half only
    want = _reference(grouped)
    (b0, used0, ops0), (b1, used1, ops1) = results
    assert ops0 == ops1 and used0 == used1 == GLOBAL_BATCH + 2 * 6
    assert b0 == b1
    assert torch.allclose(torch.tensor(b0, dtype=torch.float64), want, rtol=0, atol=1e-9)


def test_without_syncbn_and_with_a_sample_budget() -> None:
    """One process, plain BatchNorm: stops once num_samples are seen (whole batches) and matches the reference."""
    model = _net()
    batches = _global_batches()
    used = recompute_bn_stats(model, iter(batches), num_samples=13)
    assert used == 2 * GLOBAL_BATCH  # the first batch makes 12 < 13, the second reaches it
    assert torch.allclose(_buffers(model), _reference(batches[:2]), rtol=0, atol=1e-9)
    assert model.training  # the mode is restored
    frozen = copy.deepcopy(model)
    recompute_bn_stats(model.eval(), iter(batches[:2]), num_samples=10**6)
    assert not model.training and torch.allclose(_buffers(model), _buffers(frozen), atol=1e-12)


@pytest.mark.slow
def test_the_template_with_precise_bn_resumes_bit_identically(tmp_path) -> None:
    """syncbn.precise_bn_samples recomputes the stats from the same training slice every time, so a run killed
    mid-epoch and resumed ends where an uninterrupted one does, buffers included."""
    reference, resumed, out = killed_and_resumed(tmp_path, syncbn__precise_bn_samples=64)
    assert "PreciseBN: running stats of 7 BatchNorm layers from 64 training samples" in out  # its cost, logged
    want, got = reference["model"], resumed["model"]
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_with_ghost_batchnorm_and_under_amp() -> None:
    """Ghost BatchNorm: passes normalise per split as training does (the first layer's input does not depend on it,
    so its statistics equal the plain reference); bf16 autocast: the statistics of the bf16 activations."""
    from engine.bn import convert_ghost_batchnorm

    batches = _global_batches()
    ghost = convert_ghost_batchnorm(_net(), virtual_splits=2)
    recompute_bn_stats(ghost, batches, 10**6)
    reference = _reference(batches)
    assert torch.allclose(torch.cat([ghost[1].running_mean, ghost[1].running_var]), reference[:8], atol=1e-9)
    assert all(b.isfinite().all() for b in ghost.buffers())

    model = _net().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recompute_bn_stats(model, [b.float() for b in batches], 10**6)
    assert torch.allclose(_buffers(model).double(), reference, rtol=5e-2, atol=5e-2)
