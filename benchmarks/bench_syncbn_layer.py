"""SyncBatchNorm layer cost against its physical limit: local BatchNorm + the two bare collectives.

    python benchmarks/bench_syncbn_layer.py                      # CPU, 2 spawned gloo ranks, 1 thread each
    python benchmarks/bench_syncbn_layer.py --quick              # 3 shapes, for a smoke test
    torchrun --nproc_per_node=2 benchmarks/bench_syncbn_layer.py --gpu [--dtype bf16] [--channels-last] [--compile]

For ResNet-50 BatchNorm shapes (per-process batch 32 at 224px, and batch 2 at a detection resolution of
800x1216, stride 8/16/32) it times, per layer and side by side (round-robin, median over repeats):
  bn     local nn.BatchNorm2d, forward + backward (the floor of any BatchNorm)
  ours   engine.bn via convert_sync_batchnorm(impl="ours", collective="all_gather"), forward + backward
  ours_ar the same with collective="all_reduce" (one O(C) all-reduce of 2C+1 fp64 sums forward)
  naive  a pure-PyTorch SyncBN as older libraries wrote it: two autograd all_reduces (sum, sum of squares)
  torch  torch.nn.SyncBatchNorm (GPU only: it refuses CPU tensors once a process group exists)
  coll   the bare collectives ours issues: all_gather of 2C+1 floats (forward) + all_reduce of 2C floats (backward)
  coll_ar the bare collectives ours_ar issues: all_reduce of 2C+1 doubles (forward) + all_reduce of 2C floats
  limit  bn followed by the forward collective, its backward followed by the backward collective: ranks wait for
         each other twice per step, as in any SyncBN, so jitter between ranks is paid here too (the lockstep floor)
and the goal ratio (ours - bn) / coll <= 1.2: what the layer adds on top of local BatchNorm is at most
20% more than the communication it cannot avoid. (limit - bn) / coll shows how much of that a lockstep floor
already exceeds on this machine, and ours / limit how far ours is from that floor. Alternative collective forms
are timed too, for the record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import (  # noqa: E402
    fmt_stat,
    init_from_torchrun,
    interleaved_times,
    machine_banner,
    med,
    print_table,
    ratio_stat,
    run_ranks,
    under_torchrun,
    verdict,
)
from torch import nn  # noqa: E402

from engine.bn import convert_sync_batchnorm  # noqa: E402
from engine.runtime.distributed import cleanup  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes of the naive layer's collectives
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

GOAL = 1.2

# (label, per-process N, C, H, W). ResNet-50 at 224px: stem 112x112 and layer1's 256@56x56 (25.7M values per rank)
# are left out on CPU (about a second per fwd+bwd on one core); the subset keeps one narrow and one wide layer per
# stage. Detection: 2 images of 800x1216 at strides 8/16/32 (the FPN levels a ResNet-50-FPN normalises).
CLASSIC = [(f"r50 b32 layer{stage} {c}@{hw}", 32, c, hw, hw)
           for stage, c, hw in ((1, 64, 56), (2, 128, 28), (2, 512, 28), (3, 256, 14), (3, 1024, 14), (4, 512, 7),
                                (4, 2048, 7))]  # fmt: skip
DETECTION = [(f"det b2 s{stride} {c}@{h}x{w}", 2, c, h, w)
             for stride, c, h, w in ((8, 128, 100, 152), (16, 256, 50, 76), (16, 1024, 50, 76), (32, 512, 25, 38),
                                     (32, 2048, 25, 38))]  # fmt: skip
QUICK = [CLASSIC[3], CLASSIC[6], DETECTION[3]]
FULL_EXTRA = [("r50 b32 stem 64@112", 32, 64, 112, 112), ("r50 b32 layer1 256@56", 32, 256, 56, 56),
              ("det b2 s8 512@100x152", 2, 512, 100, 152)]


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """SyncBN as many older codebases wrote it: all_reduce(sum), all_reduce(sum of squares), autograd does the rest.

    Assumes equal batches on every rank; the backward is autograd's through two differentiable all_reduces.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        world = dist.get_world_size()
        dims = [0, 2, 3]
        xf = x.float()
        s = all_reduce(xf.sum(dims))
        sq = all_reduce((xf * xf).sum(dims))
        n = x.numel() // x.size(1) * world
        mean = s / n
        var = sq / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.mul_(1 - self.momentum).add_(mean.detach() * self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var.detach() * n / (n - 1) * self.momentum)
        invstd = torch.rsqrt(var + self.eps)
        scale = (self.weight * invstd).view(1, -1, 1, 1)
        shift = (self.bias - mean * self.weight * invstd).view(1, -1, 1, 1)
        return (xf * scale + shift).to(x.dtype)


def _gather_forms(C: int, device: torch.device, world: int, bn_step_parts: tuple) -> dict:
    """Bare collectives of the sizes SyncBN sends (the form ours uses and the alternatives), and the limit.

    "limit" is local BatchNorm followed by ours' forward collective, then its backward followed by ours' backward
    collective: one lockstep point per pass, as in ours, so it is the cheapest any SyncBN can be here, the waits
    between ranks included.
    """
    fwd = torch.randn(2 * C + 1, device=device)
    bwd = torch.randn(2 * C, device=device)
    out = torch.empty(world * (2 * C + 1), device=device)
    rows = list(torch.empty(world, 2 * C + 1, device=device).unbind(0))
    red = torch.randn(2 * C + 1, device=device, dtype=torch.float64)
    naive_a, naive_b = torch.randn(C, device=device), torch.randn(C, device=device)

    def gather_single():
        _gather_single(out, fwd)

    def gather_list():
        dist.all_gather(rows, fwd)

    def reduce_bwd():
        dist.all_reduce(bwd)

    def reduce_fwd():
        dist.all_reduce(red)

    def naive4():  # what the naive layer issues: 2 all_reduces of C forward, 2 backward
        for t in (naive_a, naive_b, naive_a, naive_b):
            dist.all_reduce(t)

    bn_forward, bn_backward = bn_step_parts

    def limit():
        y = bn_forward()
        gather_single()
        bn_backward(y)
        reduce_bwd()

    return {
        "limit": limit,
        "coll": lambda: (gather_single(), reduce_bwd()),  # what engine/syncbn.py issues (checked below)
        "gather_list+reduce": lambda: (gather_list(), reduce_bwd()),
        "coll_ar": lambda: (reduce_fwd(), reduce_bwd()),  # what the all_reduce path issues
        "naive_coll": naive4,
    }


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, compiled: bool):
    params = [x, *module.parameters()]
    fn = torch.compile(module) if compiled else module

    def forward() -> torch.Tensor:
        return fn(x)

    def backward(y: torch.Tensor) -> None:
        torch.autograd.grad(y, params, grad)

    return forward, backward


def bench_rank(rank: int, world: int, shapes: list, repeats: int, opts: dict, device: torch.device | None = None):
    device = device or torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts["dtype"]]
    torch.manual_seed(rank)
    backend = str(dist.get_backend())
    results = []
    for label, n, c, h, w in shapes:
        x = torch.randn(n, c, h, w, device=device, dtype=dtype) * 2 + 0.5
        if opts["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        variants = {
            "bn": nn.BatchNorm2d(c).to(device),
            "ours": convert_sync_batchnorm(nn.BatchNorm2d(c), impl="ours", collective="all_gather").to(device),
            "ours_ar": convert_sync_batchnorm(nn.BatchNorm2d(c), impl="ours", collective="all_reduce").to(device),
            "naive": NaiveSyncBatchNorm(c).to(device),
        }
        if device.type == "cuda":
            variants["torch"] = convert_sync_batchnorm(nn.BatchNorm2d(c).to(device), impl="torch")
        parts = {k: _fwd_bwd(m, x, grad, opts["compile"] and k != "naive") for k, m in variants.items()}
        fns = {k: (lambda f=f, b=b: b(f())) for k, (f, b) in parts.items()}
        fns.update(_gather_forms(c, device, world, parts["bn"]))
        elems = x.numel()
        iters = max(1, min(20, int(4e6 // elems)))  # ~4M values per timed block
        times = interleaved_times(fns, repeats, iters, device, barrier=dist.barrier)
        results.append({"label": label, "shape": (n, c, h, w), "times": times})
    return {"backend": backend, "results": results}


def _report(per_rank: list[dict], args: argparse.Namespace) -> bool:
    backend = per_rank[0]["backend"]
    print(machine_banner(f"setup   : {len(per_rank)} ranks, backend {backend}, 1 thread/rank on CPU, dtype {args.dtype}, "
                         f"channels_last {args.channels_last}, compile {args.compile}, {args.repeats} repeats "
                         "(per repeat: slowest rank)"))
    headers = ["layer (per-rank N C H W)", "bn ms", "ours ms", "naive ms"]
    has_torch = "torch" in per_rank[0]["results"][0]["times"]
    if has_torch:
        headers.append("torch ms")
    headers += ["coll ms", "limit ms", "(ours-bn)/coll", "goal<=1.2", "(limit-bn)/coll", "ours/limit", "naive/ours",
                "ours_ar ms", "coll_ar ms", "(ours_ar-bn)/coll_ar", "ours_ar/ours"]
    rows, alt_rows, all_ok = [], [], True
    for i, res in enumerate(per_rank[0]["results"]):
        # a repeat ends when the slowest rank ends: take the max over ranks, repeat by repeat
        t = {k: [max(r["results"][i]["times"][k][j] for r in per_rank) for j in range(args.repeats)]
             for k in res["times"]}
        over = ratio_stat([o - b for o, b in zip(t["ours"], t["bn"])], t["coll"])
        limit_over = ratio_stat([o - b for o, b in zip(t["limit"], t["bn"])], t["coll"])
        ok = med(over) <= GOAL
        all_ok &= ok
        row = [f"{res['label']} {'x'.join(map(str, res['shape']))}", fmt_stat(t["bn"], 1e3), fmt_stat(t["ours"], 1e3),
               fmt_stat(t["naive"], 1e3)]
        if has_torch:
            row.append(fmt_stat(t["torch"], 1e3))
        row += [fmt_stat(t["coll"], 1e3), fmt_stat(t["limit"], 1e3), fmt_stat(over, 1, 1), verdict(ok),
                fmt_stat(limit_over, 1, 1), fmt_stat(ratio_stat(t["ours"], t["limit"]), 1, 2),
                f"{med(ratio_stat(t['naive'], t['ours'])):.2f}", fmt_stat(t["ours_ar"], 1e3),
                fmt_stat(t["coll_ar"], 1e3),
                fmt_stat(ratio_stat([o - b for o, b in zip(t["ours_ar"], t["bn"])], t["coll_ar"]), 1, 1),
                fmt_stat(ratio_stat(t["ours_ar"], t["ours"]), 1, 2)]
        rows.append(row)
        alt_rows.append([res["label"], fmt_stat(t["coll"], 1e3, 4), fmt_stat(t["gather_list+reduce"], 1e3, 4),
                         fmt_stat(t["coll_ar"], 1e3, 4), fmt_stat(t["naive_coll"], 1e3, 4)])
    print_table(headers, rows, "SyncBN layer, forward + backward (median [min-max] over repeats)")
    print_table(["layer", "gather_into_tensor+all_reduce ms", "list all_gather+all_reduce ms",
                 "all_reduce(2C+1 fp64)+all_reduce ms", "naive 4x all_reduce(C) ms"], alt_rows,
                "Bare collectives, by form (forward 2C+1 floats + backward 2C floats)")
    print(f"goal (ours - bn) / coll <= {GOAL} on every layer: {verdict(all_ok)}")
    return all_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 shapes, for a smoke test")
    parser.add_argument("--full", action="store_true", help="also the largest layers (stem, layer1 256@56)")
    parser.add_argument("--only", choices=["classic", "detection"], default=None)
    parser.add_argument("--world-size", type=int, default=2, help="CPU: spawned gloo ranks")
    parser.add_argument("--gpu", action="store_true", help="under torchrun: NCCL, one GPU per rank, + torch.nn.SyncBatchNorm")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile bn/ours/torch modules (GPU path)")
    args = parser.parse_args()
    shapes = QUICK if args.quick else (CLASSIC if args.only != "detection" else []) + \
        (DETECTION if args.only != "classic" else [])
    if args.full:
        shapes = shapes + FULL_EXTRA
    opts = {"dtype": args.dtype, "channels_last": args.channels_last, "compile": args.compile}
    if args.gpu or under_torchrun():
        rank, world, device = init_from_torchrun("nccl" if args.gpu else "auto")
        mine = bench_rank(rank, world, shapes, args.repeats, opts, device)
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, mine)
        ok = _report(per_rank, args) if rank == 0 else True
        cleanup()
        return 0 if ok else 1
    per_rank = run_ranks(bench_rank, args.world_size, shapes, args.repeats, opts)
    return 0 if _report(per_rank, args) else 1


if __name__ == "__main__":
    sys.exit(main())
