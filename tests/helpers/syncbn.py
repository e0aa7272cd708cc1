"""Shared machinery of the SyncBN tests: the BatchNorm reference, collective counting, and the case runner.

References are always computed independently: the whole global batch is generated from a seed on every rank and
fed to torch's ``BatchNormNd``; each rank feeds its own slice to the layer under test.

Process start-up dominates (torch import on slow cores), so a test file's distributed checks are *cases*: plain
functions ``case(rank, world_size)`` run one after another in ONE spawned group per world size
(:func:`case_results`, cached). A case collects its mismatches and asserts only after its last collective, so a
failing case does not desynchronise the next; each case is still its own pytest item (:func:`assert_case_passed`).
"""

from __future__ import annotations

import copy
import functools
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine.bn import SyncBatchNorm
from engine.runtime.comm_debug import CommLog
from engine.runtime.spawn import SpawnError, spawn

CHANNELS = 3
TAILS = {2: (), 3: (4,), 4: (3, 4), 5: (2, 3, 2)}  # trailing dims per input rank
SIZES = {  # per-rank batch sizes
    "equal": {2: [4, 4], 3: [3, 3, 3], 4: [2, 2, 2, 2]},
    "uneven": {2: [5, 2], 3: [4, 1, 3], 4: [4, 1, 3, 2]},
    "empty": {2: [5, 0], 3: [3, 0, 4], 4: [3, 0, 4, 0]},
    "ones": {2: [1, 1], 3: [1, 1, 1], 4: [1, 1, 1, 1]},  # each rank alone would be BatchNorm's count-1 error
}
Case = Callable[..., None]  # case(rank, world_size) or case(rank, world_size, path)


PATHS = ("all_gather", "all_reduce")  # SyncBatchNorm's forward collectives: every layer test runs on both


def bn_class(ndim: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def batch(seed: int, n: int, tail: tuple[int, ...], dtype: torch.dtype, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """The whole global batch and an upstream gradient, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CHANNELS, *tail, generator=gen, dtype=torch.float64) * 2 + 0.5 + offset
    g = torch.randn(n, CHANNELS, *tail, generator=gen, dtype=torch.float64)
    return x.to(dtype), g


def span(sizes: list[int], rank: int) -> slice:
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def close(errs: list[str], what: str, got: Tensor, want: Tensor, atol: float, rtol: float = 0.0) -> None:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        errs.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    elif not torch.allclose(got, want, atol=atol, rtol=rtol):
        errs.append(f"{what}: max abs err {(got - want).abs().max().item():.3e} > atol {atol:.1e}")


def identical_on_all_ranks(errs: list[str], what: str, t: Tensor, group: Any = None) -> None:
    """Bitwise equality of ``t`` across the group (one all_gather)."""
    size = dist.get_world_size(group)
    rows = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(rows, t.contiguous(), group=group)
    if not all(torch.equal(rows[0], r) for r in rows):
        errs.append(f"{what}: differs across ranks")


def sum_over_group(t: Tensor, group: Any = None) -> Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def randomize(bn: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)


def collectives(log: CommLog) -> list[tuple[str, int, torch.dtype | None]]:
    """(op, numel contributed, dtype) of each collective a :func:`count_comm` block ran."""
    return [(c.op, c.numel, c.dtype) for c in log.collectives]


def compare_with_bn(
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
    collective: str = "auto",
) -> SyncBatchNorm:
    """Train ours on this rank's slice and BatchNormNd on the whole batch; record every mismatch in ``errs``.

    Checks output, input grad, summed weight/bias grads, running stats and num_batches_tracked after each step,
    and that the running buffers are bit-identical across the group. Returns our layer.
    """
    bn_kwargs = bn_kwargs or {}
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref = bn_class(ndim)(CHANNELS, dtype=ref_dtype, **bn_kwargs)
    randomize(ref, seed)
    ours = SyncBatchNorm(CHANNELS, process_group=group, dtype=param_dtype, collective=collective, **bn_kwargs)
    ours.load_state_dict(ref.state_dict())
    mine = span(sizes, rank)
    for step in range(steps):
        x, g = batch(seed + step, sum(sizes), TAILS[ndim], dtype)
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
        close(errs, f"{where} output", y, yr[mine], atol)
        close(errs, f"{where} input grad", xl.grad, xr.grad[mine], atol)
        for name, p_ref in ref.named_parameters():
            close(errs, f"{where} {name} grad", sum_over_group(getattr(ours, name).grad, group), p_ref.grad, atol)
        ours.zero_grad()
        ref.zero_grad()
        if ours.running_mean is not None:
            close(errs, f"{where} running_mean", ours.running_mean, ref.running_mean, atol)
            close(errs, f"{where} running_var", ours.running_var, ref.running_var, atol)
            if not torch.equal(ours.num_batches_tracked, ref.num_batches_tracked):
                errs.append(f"{where}: num_batches_tracked {ours.num_batches_tracked} != {ref.num_batches_tracked}")
            buffers = torch.cat([ours.running_mean, ours.running_var])
            identical_on_all_ranks(errs, f"{where} running buffers", buffers, group)
    return ours


# --------------------------------------------------------------------------------------------- distributed cases


def small_net(seed: int) -> nn.Module:
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


def images(seed: int, n: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def bn_buffers(model: nn.Module) -> Tensor:
    return torch.cat([b.float().reshape(-1) for name, b in model.named_buffers() if "running" in name])


# --------------------------------------------------------------------------------------------- the case runner


def with_paths(*cases: Case) -> tuple[tuple[Case, str], ...]:
    """Each case once per forward collective (the case gets it as its third argument)."""
    return tuple((case, path) for case in cases for path in PATHS)


def case_id(entry: tuple[Case, str | None]) -> str:
    case, path = entry
    return case.__name__ if path is None else f"{case.__name__}[{path}]"


def _run_cases(rank: int, world_size: int, cases: tuple[tuple[Case, str | None], ...]) -> dict[str, str | None]:
    """Every case in this process, in order; a failure is recorded (as its traceback) and the next case still runs."""
    results: dict[str, str | None] = {}
    for case, path in cases:
        try:
            case(rank, world_size) if path is None else case(rank, world_size, path)
            results[case_id((case, path))] = None
        except Exception:  # noqa: BLE001 - reported per case in the parent
            results[case_id((case, path))] = traceback.format_exc()
        dist.barrier()
    return results


@functools.cache
def case_results(cases: tuple[tuple[Case, str | None], ...], world_size: int) -> list[dict[str, str | None]] | SpawnError:
    """Every rank's results of ``cases`` from one spawned group, computed once and shared by the pytest items."""
    try:
        return spawn(_run_cases, world_size, cases, timeout_s=90)
    except SpawnError as err:  # a hang or crash: every case of this group reports it
        return err


def assert_case_passed(cases: tuple[tuple[Case, str | None], ...], world_size: int, entry: tuple[Case, str | None]) -> None:
    results = case_results(cases, world_size)
    if isinstance(results, SpawnError):
        raise results
    key = case_id(entry)
    failures = [f"rank {r}:\n{res[key]}" for r, res in enumerate(results) if res[key] is not None]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------- population statistics


def population_statistics(model: nn.Module, batches: list[Tensor], splits: int = 1,
                          amp: torch.dtype | None = None) -> dict[str, tuple[Tensor, Tensor]]:  # fmt: skip
    """What each BatchNorm of ``model`` sees over ``batches``, computed here, independently of engine.bn: plain
    training-mode passes (each batch in ``splits`` chunks on its own, as ghost BatchNorm normalises; under ``amp``
    autocast when given), every position of every sample of each layer's input pooled in fp64. Returns, per layer
    name, (mean, unbiased variance). ``model`` is left untouched."""
    model = copy.deepcopy(model).train()
    seen: dict[str, list[Tensor]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.register_forward_pre_hook(lambda m, i, name=name: seen.setdefault(name, []).append(
                i[0].double().transpose(0, 1).reshape(i[0].size(1), -1)))
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        for x in batches:
            for chunk in x.chunk(splits):
                model(chunk)
    return {name: (torch.cat(v, 1).mean(1), torch.cat(v, 1).var(1)) for name, v in seen.items()}
