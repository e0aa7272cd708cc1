"""Where the template's per-step time goes, beyond the model: the pieces the minimal loop does not have.

    python benchmarks/bench_template_overheads.py

In 2 spawned gloo ranks (1 thread each), timed round-robin, median over repeats, per optimizer step:
  flags      engine.preemption.StopFlags.sync: one 4-float all_reduce + .tolist() host read
  logger     MetricLogger.update + log_every bookkeeping (no printing: print_freq large)
  sched      LambdaLR.step of build_scheduler
  aug_fork   32 x SeededAugmentation.__getitem__ in the main process (fork_rng + manual_seed per sample)
  aug_cpu_seed  the same with torch.default_generator.manual_seed instead of torch.manual_seed (recommended)
  aug_plain  32 x the same dataset __getitem__ without the seeding (what the augmentation itself costs)
  step       a small_cnn 32px batch-32 DDP training step (the reference the overheads are divided by)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import REPO_ROOT, fmt_stat, interleaved_times, machine_banner, print_table, ratio_stat, run_ranks  # noqa: E402


def measure(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from data import build_datasets
    from data.loaders import SeededAugmentation
    from engine.config import load_config
    from engine.logging import MetricLogger
    from engine.optim import build_optimizer, build_scheduler
    from engine.preemption import StopFlags
    from engine.syncbn import convert_sync_batchnorm
    from models import build_model

    cfg = load_config(str(REPO_ROOT / "configs" / "default.yaml"), ["data.num_train=512", "data.num_val=64"])
    model = DDP(convert_sync_batchnorm(build_model(cfg.model)), forward_sync_buffers=False)
    opt = build_optimizer(model, cfg.train, 0.05)
    sched = build_scheduler(opt, cfg.train, 10**6)
    ds = build_datasets(cfg.data, 10, 0).train
    seeded = SeededAugmentation(ds, 0)
    x, y = ds.images[:32], ds.labels[:32]
    flags = StopFlags()
    loss_sum = torch.zeros(())
    logger = MetricLogger("bench", 10**9, rank == 0, False)
    ticker = iter(logger.log_every(iter(int, 1), 10**9, 32))  # endless: one next() per step
    counter = [0]

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def flag_sync():
        flags.sync(loss_sum, 32)

    def log():
        next(ticker)
        logger.update(loss=1.0, lr=0.1)

    def aug_fork():
        counter[0] += 1
        for i in range(32):
            seeded[(i, counter[0])]

    def aug_cpu_seed():  # the recommended SeededAugmentation: seed only the CPU generator (what fork_rng forks)
        counter[0] += 1
        for i in range(32):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(hash((0, counter[0], i)) & 0x7FFF_FFFF_FFFF_FFFF)
                ds[i]

    def aug_plain():
        for i in range(32):
            ds[i]

    fns = {"step": step, "flags": flag_sync, "logger": log, "sched": sched.step, "aug_fork": aug_fork,
           "aug_cpu_seed": aug_cpu_seed, "aug_plain": aug_plain}
    return interleaved_times(fns, repeats=7, iters=10, device=torch.device("cpu"), barrier=dist.barrier)


def main() -> int:
    per_rank = run_ranks(measure, 2)
    t = {k: [max(r[k][i] for r in per_rank) for i in range(len(per_rank[0][k]))] for k in per_rank[0]}
    print(machine_banner("setup   : 2 ranks, gloo, 1 thread each; small_cnn 32px batch 32/rank, SyncBN on; 7 repeats"))
    rows = [[k, fmt_stat(v, 1e3, 3), fmt_stat(ratio_stat(v, t["step"]), 100, 2)] for k, v in t.items()]
    print_table(["piece (per optimizer step)", "ms", "% of a training step"], rows,
                "Template per-step overheads (median [min-max])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
