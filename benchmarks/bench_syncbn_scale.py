"""SyncBN's communication at scale: bytes each rank receives per training step, on paper and counted.

    python benchmarks/bench_syncbn_scale.py              # table for ResNet-50, then counted at W = 2, 4, 8 on CPU
    python benchmarks/bench_syncbn_scale.py --no-measure # the table only

For ResNet-50's 53 BatchNorm layers (26,560 channels), per rank and training step:
  torch        torch.nn.SyncBatchNorm: all-gathers every rank's (mean, invstd, count): (W-1)(2C+1) fp32 received,
               then all-reduces 2C fp32 sums backward
  all_gather   ours, collective="all_gather": the same sizes (every rank's count, mean, M2)
  all_reduce   ours, collective="all_reduce": one all-reduce of 2C+1 fp64 sums forward, 2C fp32 backward, at any W
  gradients    DDP's fp32 gradient all-reduce of the 25.6M parameters, for scale
"Received" counts other ranks' data a rank ends up with: the all-gather's W-1 contributions, an all-reduce's one
result (a ring all-reduce moves at most twice its message over the wire: the "ring" columns). The formula is then
checked against bytes counted at the dispatcher (engine.runtime.comm_debug) from real collectives: one forward and backward
of every ResNet-50 BatchNorm shape through our layer on W gloo processes (small spatial size: bytes do not depend
on it), both paths; the ratio must be exactly 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import machine_banner, print_table, run_ranks  # noqa: E402
from torch import nn  # noqa: E402

from engine.bn import SyncBatchNorm  # noqa: E402
from engine.runtime.comm_debug import count_comm  # noqa: E402

WORLDS = (2, 8, 64, 1024, 4096, 16384)
MEASURED = (2, 4, 8)
FP32, FP64 = 4, 8


def resnet50_bn_channels() -> list[int]:
    from torchvision.models import resnet50

    return [m.num_features for m in resnet50().modules() if isinstance(m, nn.BatchNorm2d)]


def resnet50_parameters() -> int:
    from torchvision.models import resnet50

    return sum(p.numel() for p in resnet50().parameters())


def received(channels: list[int], world: int, path: str) -> tuple[int, int]:
    """(forward, backward) bytes a rank receives per step in SyncBN collectives: the formula."""
    moments = sum(2 * c + 1 for c in channels)
    backward = sum(2 * c for c in channels) * FP32
    if path == "all_reduce":
        return moments * FP64, backward
    return (world - 1) * moments * FP32, backward  # torch's design and ours' all_gather path alike


def ring(message: int, world: int) -> int:
    return round(2 * (world - 1) / world * message)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f}" if n < 1e8 else f"{n / 1e6:,.0f}"


def paper_table(channels: list[int], params: int) -> None:
    rows = []
    for w in WORLDS:
        gather_f, back = received(channels, w, "all_gather")
        reduce_f, _ = received(channels, w, "all_reduce")
        grads = params * FP32
        rows.append([f"{w:,}", _mb(gather_f + back), _mb(gather_f + back), _mb(reduce_f + back),
                     _mb(ring(reduce_f, w) + ring(back, w)), _mb(grads), _mb(ring(grads, w)),
                     f"{(gather_f + back) / (reduce_f + back):,.1f}x"])
    print_table(["W", "torch SyncBN MB", "ours all_gather MB", "ours all_reduce MB", "ours all_reduce ring MB",
                 "gradients MB", "gradients ring MB", "all_gather / all_reduce"], rows,
                f"ResNet-50: bytes received per rank per training step in SyncBN collectives "
                f"({len(channels)} BN layers, {sum(channels):,} channels; {params / 1e6:.1f}M parameters)")


def _count(rank: int, world: int, channels: list[int]) -> dict[str, tuple[int, int]]:
    """Counted at the dispatcher: one forward + backward of every BN shape, on each path."""
    out = {}
    for path in ("all_gather", "all_reduce"):
        fwd = bwd = 0
        for c in channels:
            layer = SyncBatchNorm(c, collective=path)
            x = torch.randn(2, c, 2, 2, requires_grad=True)
            with count_comm() as f:
                y = layer(x)
            with count_comm() as b:
                y.sum().backward()
            fwd += sum(col.received_bytes for col in f.collectives)
            bwd += sum(col.received_bytes for col in b.collectives)
        out[path] = (fwd, bwd)
    dist.barrier()
    return out


def measured_table(channels: list[int]) -> bool:
    rows, exact = [], True
    for w in MEASURED:
        counted = run_ranks(_count, w, channels, timeout_s=600)
        for path in ("all_gather", "all_reduce"):
            got = counted[0][path]
            want = received(channels, w, path)
            same = all(r[path] == got for r in counted)
            exact &= got == want and same
            rows.append([w, path, f"{got[0]:,}", f"{want[0]:,}", f"{got[1]:,}", f"{want[1]:,}",
                         f"{(got[0] + got[1]) / (want[0] + want[1]):.3f}", "yes" if same else "NO"])
    print_table(["W", "path", "forward counted B", "forward formula B", "backward counted B", "backward formula B",
                 "counted / formula", "same on every rank"], rows,
                "Counted at the dispatcher from real collectives (CPU, gloo), one step of ResNet-50's BN layers")
    print(f"\nformula == counted bytes on every rank, both paths, W = {', '.join(map(str, MEASURED))}: "
          f"{'yes' if exact else 'NO'}")
    return exact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-measure", action="store_true", help="the table on paper only")
    args = parser.parse_args()
    channels = resnet50_bn_channels()
    print(machine_banner("setup   : ResNet-50 BatchNorm shapes; measured on spawned gloo ranks, 1 thread each"))
    paper_table(channels, resnet50_parameters())
    return 0 if args.no_measure or measured_table(channels) else 1


if __name__ == "__main__":
    sys.exit(main())
