"""Check that SyncBatchNorm on N processes equals BatchNorm on the concatenated batch, and print a table.

Usage (from the repository root):
    python3 scripts/verify_syncbn.py                 # spawns 2 CPU processes (gloo)
    python3 scripts/verify_syncbn.py --nproc 3
    torchrun --nproc_per_node=4 scripts/verify_syncbn.py   # NCCL + CUDA when available: ours AND torch's
    python3 scripts/verify_syncbn.py --config configs/x.yaml   # whole model: one DDP step vs one process

Every rank builds the same global batch from one seed and feeds its own uneven slice; the reference is
BatchNormNd in fp64 on the whole batch. Exit status 0 when every row passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `engine` imports when run as a script

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from engine.bn import SyncBatchNorm  # noqa: E402
from engine.config import DistConfig  # noqa: E402
from engine.runtime.distributed import cleanup, init_distributed  # noqa: E402
from engine.runtime.spawn import SpawnError, spawn  # noqa: E402

CHANNELS = 4
CASES = {  # name -> trailing dims after (N, C)
    "1d (N,C)": (),
    "1d (N,C,L)": (9,),
    "2d (N,C,H,W)": (5, 6),
    "3d (N,C,D,H,W)": (3, 4, 5),
}
OURS = ("ours/all_gather", "ours/all_reduce")  # both forward collectives of engine.bn
METRICS = ("output", "input grad", "weight grad", "bias grad", "running mean", "running var")


@dataclass
class Row:
    case: str
    impl: str
    errors: list[float]
    ok: bool


# --------------------------------------------------------------------------------------------- one check


def _uneven_sizes(world_size: int) -> list[int]:
    """Different batch sizes per rank (>= 1, so torch.nn.SyncBatchNorm can be checked with the same batches)."""
    return [2 + (3 * r) % 5 for r in range(world_size)]


def _reference_bn(ndim: int) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]
    return cls(CHANNELS, dtype=torch.float64)


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _max_err(got: Tensor, want: Tensor) -> float:
    return (got.detach().double().cpu() - want.detach().cpu()).abs().max().item() if want.numel() else 0.0


def verify_case(name: str, impl: str, seed: int, device: torch.device, atol: float) -> Row:
    """One layer, one training step: ours (or torch's) on this rank's slice vs fp64 BatchNorm on the whole batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = _uneven_sizes(world)
    tail = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), CHANNELS, *tail, generator=gen, dtype=torch.float64) * 2 + 1
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ref = _reference_bn(x.dim())
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=gen)
        ref.bias.normal_(generator=gen)
    # "ours/<collective>": engine.bn on that forward collective; "torch": torch.nn.SyncBatchNorm
    if impl == "torch":
        layer = nn.SyncBatchNorm(CHANNELS).to(device)
    else:
        layer = SyncBatchNorm(CHANNELS, collective=impl.split("/")[1]).to(device)
    layer.load_state_dict(ref.state_dict())

    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * g).sum().backward()
    lo = sum(sizes[:rank])
    mine = slice(lo, lo + sizes[rank])
    xl = x[mine].float().to(device).requires_grad_()
    y = layer(xl)
    (y * g[mine].float().to(device)).sum().backward()

    grads = torch.cat([layer.weight.grad, layer.bias.grad])
    dist.all_reduce(grads)  # DDP would average these; the sum over ranks is the whole-batch gradient
    local = [
        _max_err(y, yr[mine]),
        _max_err(xl.grad, xr.grad[mine]),
        _max_err(grads[:CHANNELS], ref.weight.grad),
        _max_err(grads[CHANNELS:], ref.bias.grad),
        _max_err(layer.running_mean, ref.running_mean),
        _max_err(layer.running_var, ref.running_var),
    ]
    errors = _max_over_ranks(local, device)
    return Row(name, impl, errors, all(e <= atol for e in errors))


def verify_all(impls: list[str], seed: int, device: torch.device, atol: float) -> list[Row]:
    """Every case for every implementation; all ranks return the same rows (errors are reduced over ranks)."""
    return [verify_case(name, impl, seed + i, device, atol) for impl in impls for i, name in enumerate(CASES)]


def print_table(rows: list[Row], world_size: int, atol: float) -> None:
    head = f"{'case':<16} {'impl':<15} " + " ".join(f"{m:>12}" for m in METRICS) + "  result"
    print(f"SyncBatchNorm vs BatchNorm on the concatenated batch: {world_size} ranks, sizes "
          f"{_uneven_sizes(world_size)}, max abs error, atol {atol:g}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        errs = " ".join(f"{e:>12.2e}" for e in r.errors)
        print(f"{r.case:<16} {r.impl:<15} {errs}  {'PASS' if r.ok else 'FAIL'}")


def _check_and_report(impls: list[str], args: argparse.Namespace, device: torch.device) -> int:
    if args.config:
        from scripts.verify_model import check_model  # lazy: only this mode needs models/ and data/

        return check_model(args.config, device, args.atol)
    rows = verify_all(impls, args.seed, device, args.atol)
    if dist.get_rank() == 0:
        print_table(rows, dist.get_world_size(), args.atol)
    return 0 if all(r.ok for r in rows) else 1


# --------------------------------------------------------------------------------------------- modes


def run_spawned(args: argparse.Namespace) -> int:
    """CPU check: ``--nproc`` gloo processes from the template's spawner, each with a deadline."""
    try:
        codes = spawn(_spawned_entry, args.nproc, args, timeout_s=args.timeout)
    except SpawnError as err:
        print(f"verify_syncbn: {err}", file=sys.stderr)
        return 2
    return max(codes)


def _spawned_entry(rank: int, world_size: int, args: argparse.Namespace) -> int:
    return _check_and_report(list(OURS), args, torch.device("cpu"))


def run_under_torchrun(args: argparse.Namespace) -> int:
    """torchrun: NCCL + one GPU per rank when CUDA is there (checking ours and torch's), else gloo on CPU."""
    ctx = init_distributed(DistConfig(timeout_s=args.timeout, exit_with_launcher=False))
    try:
        cuda = ctx.device.type == "cuda"
        return _check_and_report([*OURS, "torch"] if cuda else list(OURS), args, ctx.device)
    finally:
        cleanup()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn on CPU (ignored under torchrun)")
    parser.add_argument("--config", help="YAML config: check the whole model instead of single layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-4, help="max abs error allowed (fp32 vs fp64 reference)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a hung collective fails")
    args = parser.parse_args(argv)
    if args.nproc < 2 and "WORLD_SIZE" not in os.environ:
        parser.error("--nproc must be at least 2 (one process never synchronises anything)")
    if args.config and _model_family_of_config(args.config, parser) == "detection":
        parser.error("--config: a detection config cannot be checked against one process (each rank samples its "
                     "own proposals at random); check the SyncBN layers without --config and the detector by training")
    return args


def _model_family_of_config(path: str, parser: argparse.ArgumentParser) -> str:
    from engine.config import load_config, task_of
    from engine.errors import ConfigError

    try:
        return task_of(load_config(path)).model_family
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        return run_under_torchrun(args)
    return run_spawned(args)


if __name__ == "__main__":
    sys.exit(main())
