"""GPU suite (not run in the CPU-only session that wrote it): ResNet-50, batch 32/GPU, AMP bf16, SyncBN impls.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_end_to_end_gpu.py [--steps 30] [--repeats 3]
    (or: torchrun ... benchmarks/bench_end_to_end.py --gpu-resnet50)

For every combination of BatchNorm {local BN, ours (engine.bn), torch.nn.SyncBatchNorm} x channels_last
{off, on} x torch.compile {off, on}, a minimal DDP step (synthetic on-device batch, SGD, bf16 autocast) is timed
with CUDA synchronisation, round-robin over configurations, median of repeats; rank 0 prints ms/step and the
ratios ours/torch and SyncBN/BN. (A compile failure is reported in the table, not fatal.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import fmt_stat, init_from_torchrun, machine_banner, med, print_table, under_torchrun  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from engine.bn import convert_sync_batchnorm  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.runtime.distributed import cleanup  # noqa: E402
from models import build_model  # noqa: E402


def _build(kind: str, channels_last: bool, compiled: bool, device: torch.device):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet50", num_classes=1000)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if kind != "bn":
        model = convert_sync_batchnorm(model, impl=kind)
    model = DDP(model, device_ids=[device.index], forward_sync_buffers=kind == "bn")
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args, _ = parser.parse_known_args()
    if not (under_torchrun() and torch.cuda.is_available()):
        print("bench_end_to_end_gpu: needs GPUs and torchrun: "
              "torchrun --standalone --nproc_per_node=2 benchmarks/bench_end_to_end_gpu.py", file=sys.stderr)
        return 2
    rank, world, device = init_from_torchrun("nccl")
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    configs = [(k, cl, c) for k in ("bn", "ours", "torch") for cl in (False, True) for c in (False, True)]
    steps: dict = {}
    times: dict = {cfg: [] for cfg in configs}
    errors: dict = {}
    for cfg in configs:
        try:
            steps[cfg] = _build(*cfg, device)
        except Exception as exc:  # noqa: BLE001 - report, keep going
            errors[cfg] = f"{type(exc).__name__}: {exc}"[:80]

    def run(cfg, n):
        model, opt = steps[cfg]
        xin = x.contiguous(memory_format=torch.channels_last) if cfg[1] else x
        for _ in range(n):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(xin), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for cfg in list(steps):
        try:
            run(cfg, 5)  # warm-up, compilation
        except Exception as exc:  # noqa: BLE001
            errors[cfg] = f"{type(exc).__name__}: {exc}"[:80]
            del steps[cfg]
    for r in range(args.repeats):
        for cfg in (list(steps) if r % 2 == 0 else list(reversed(list(steps)))):
            dist.barrier()
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            run(cfg, args.steps)
            torch.cuda.synchronize(device)
            times[cfg].append((time.perf_counter() - t0) / args.steps)
    if rank == 0:
        print(machine_banner(f"setup   : {world} GPUs, NCCL, resnet50 b{args.batch}/GPU 224px, bf16 autocast, "
                             f"{args.steps} steps x {args.repeats} repeats"))
        rows = []
        for kind, cl, c in configs:
            cfg = (kind, cl, c)
            if cfg in errors:
                rows.append([kind, cl, c, f"failed: {errors[cfg]}", "", ""])
                continue
            t = times[cfg]
            vs_bn = med(t) / med(times[("bn", cl, c)]) if times.get(("bn", cl, c)) else float("nan")
            vs_torch = med(t) / med(times[("torch", cl, c)]) if times.get(("torch", cl, c)) else float("nan")
            rows.append([kind, cl, c, fmt_stat(t, 1e3, 1), f"{vs_bn:.3f}", f"{vs_torch:.3f}"])
        print_table(["BatchNorm", "channels_last", "compile", "ms/step", "/ local BN", "/ torch SyncBN", "images/s/GPU"],
                    [[*row, f"{args.batch * 1e3 / float(row[3].split()[0]):.0f}" if row[4] else ""] for row in rows],
                    "ResNet-50 training step on GPU (median [min-max])")
        synced = [args.batch / med(times[cfg]) for cfg in configs if cfg[0] != "bn" and times.get(cfg)]
        if synced:  # for benchmarks/gpu_check.sh: the rate the input pipeline must feed, with SyncBN
            print(f"FASTEST_SYNCBN_IMAGES_PER_S {max(synced):.0f}")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
