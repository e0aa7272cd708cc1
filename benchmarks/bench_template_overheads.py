"""Where the template's per-step time goes, beyond the model: the pieces the minimal loop does not have.

    python benchmarks/bench_template_overheads.py

In 2 spawned gloo ranks (1 thread each), timed round-robin, median over repeats, per optimizer step:
  step        a small_cnn 32px batch-32 DDP training step, SyncBN on (what the overheads are divided by)
  flags       engine.preemption.StopFlags.start_sync: one 4-float all_reduce + .tolist() host read, not
              overlapped here (the trainer overlaps it with the backward)
  loader      next() on the template's train loader (num_workers 0, augmentation off), vs indexing the tensors
  loader_aug  the same with augmentation on (seeded per sample: data/loaders.SeededAugmentation)
  index       the minimal loop's input: a random index into the in-memory tensors
  logger      MetricLogger.update + log_every bookkeeping (no printing: print_freq large)
  sched       LambdaLR.step of build_scheduler
  eval/epoch  engine.trainer.evaluate over one batch per rank, divided by the 24 steps of the e2e benchmark's
              epoch (bench_end_to_end.py charges the template's epoch time with it)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import REPO_ROOT, fmt_stat, interleaved_times, machine_banner, print_table, ratio_stat, run_ranks  # noqa: E402

STEPS_PER_EPOCH = 24  # bench_end_to_end.py's default suite: 1536 samples / (2 ranks x 32)


def measure(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from data import build_datasets
    from data.loaders import build_train_loader, build_val_loader
    from engine.config import load_config
    from engine.logging import MetricLogger
    from engine.optim import build_optimizer, build_scheduler
    from engine.preemption import StopFlags
    from engine.syncbn import convert_sync_batchnorm
    from engine.trainer import evaluate
    from models import build_model

    overrides = ["data.num_train=4096", "data.num_val=64", "data.augment=false"]
    cfg = load_config(str(REPO_ROOT / "configs" / "default.yaml"), overrides)
    cfg_aug = load_config(str(REPO_ROOT / "configs" / "default.yaml"), overrides[:2] + ["data.augment=true"])
    raw = convert_sync_batchnorm(build_model(cfg.model))
    model = DDP(raw, forward_sync_buffers=False)
    opt = build_optimizer(model, cfg.train, 0.05)
    sched = build_scheduler(opt, cfg.train, 10**6)
    data, data_aug = build_datasets(cfg.data, 10, 0), build_datasets(cfg_aug.data, 10, 0)
    x, y = data.train.images[:32], data.train.labels[:32]

    def endless(loader):
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    batches = endless(build_train_loader(data.train, cfg.data, 0, rank, world, False))
    batches_aug = endless(build_train_loader(data_aug.train, cfg_aug.data, 0, rank, world, False))
    val_loader = build_val_loader(data.val, cfg.data, rank, world, False)
    flags = StopFlags()
    loss_sum = torch.zeros(())
    logger = MetricLogger("bench", 10**9, rank == 0, False)
    ticker = iter(logger.log_every(iter(int, 1), 10**9, 32))  # endless: one next() per step

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def index():
        idx = torch.randint(0, len(data.train), (32,))
        return data.train.images[idx], data.train.labels[idx]

    def log():
        next(ticker)
        logger.update(loss=1.0, lr=0.1)

    def eval_once():  # scaled to per-step below: the template evaluates once per epoch
        evaluate(raw, val_loader, torch.device("cpu"), "off", False)
        model.train()

    fns = {"step": step, "flags": lambda: flags.start_sync(loss_sum, 32)(), "loader": lambda: next(batches),
           "loader_aug": lambda: next(batches_aug), "index": index, "logger": log, "sched": sched.step,
           "eval/epoch": eval_once}
    times = interleaved_times(fns, repeats=7, iters=10, device=torch.device("cpu"), barrier=dist.barrier)
    times["eval/epoch"] = [t / STEPS_PER_EPOCH for t in times["eval/epoch"]]
    return times


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
