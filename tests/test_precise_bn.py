"""PreciseBN (``engine.bn.recompute_bn_stats``): population statistics of every BatchNorm, exact and the same at
any world size, against an independent fp64 reference (one process, plain BatchNorm, every layer input kept)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from engine.bn import convert_sync_batchnorm, recompute_bn_stats
from engine.runtime.comm_debug import count_comm
from engine.runtime.spawn import spawn
from tests.helpers.jobs import killed_and_resumed
from tests.helpers.syncbn import population_statistics

GLOBAL_BATCH, STEPS = 12, 3  # 12 divides over 1, 2 and 3 ranks


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                         nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(5 * 4 * 4)).double()


def _global_batches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 3 for _ in range(STEPS)]


def _buffers(model: nn.Module) -> Tensor:
    """[mean, var] of each BatchNorm layer, layer after layer, in fp64."""
    return torch.cat([torch.cat([m.running_mean, m.running_var]).double() for _, m in _bn_layers(model)])


def _reference(global_batches: list[Tensor], splits: int = 1, amp: torch.dtype | None = None) -> Tensor:
    """The population statistics of plain BatchNorm over each global batch (see ``population_statistics``), as one
    vector in the order of :func:`_buffers`."""
    model = _net() if amp is None else _net().float()
    stats = population_statistics(model, [x.to(next(model.parameters()).dtype) for x in global_batches], splits, amp)
    return torch.cat([torch.cat([stats[name][0], stats[name][1]]) for name, _ in _bn_layers(model)])


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


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


def test_with_ghost_batchnorm_every_layer_against_a_per_split_reference() -> None:
    """Ghost BatchNorm: the passes normalise per split, as training did, so every later layer's statistics are those
    of the split-normalised activations (the first layer's input does not depend on the splits; the others do)."""
    from engine.bn import convert_ghost_batchnorm

    batches = _global_batches()
    ghost = convert_ghost_batchnorm(_net(), virtual_splits=2)
    recompute_bn_stats(ghost, batches, 10**6)
    want = _reference(batches, splits=2)
    assert torch.allclose(_buffers(ghost), want, rtol=0, atol=1e-9)
    assert not torch.allclose(want, _reference(batches), rtol=0, atol=1e-6)  # the splits matter past the first layer


def test_under_bf16_autocast_the_statistics_of_the_bf16_activations() -> None:
    """Under bf16 autocast (the caller's, or the template's SettlePolicy.amp_dtype), the statistics are those of the
    activations bf16 produces: to fp32 accumulation, far inside the bf16-vs-fp32 gap."""
    from engine.bn import RunningStatistics, SettlePolicy

    batches = [b.float() for b in _global_batches()]
    want, fp32 = _reference(batches, amp=torch.bfloat16), _reference(batches)
    gap = (want - fp32).abs().max().item()
    model = _net().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recompute_bn_stats(model, batches, 10**6)
    settled = _net().float()
    stats = RunningStatistics(SettlePolicy(synchronised=True, amp_dtype=torch.bfloat16), precise_batches=batches)
    stats.track(settled, precise_samples=10**6)
    stats.before_evaluation(step=0)
    for got in (_buffers(model).double(), _buffers(settled).double()):
        error = (got - want).abs().max().item()
        assert error < 1e-3 * gap, (error, gap)
