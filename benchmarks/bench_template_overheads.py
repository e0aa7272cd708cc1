"""Where the template's per-step time goes, beyond the model: its training loop against the minimal one, in the
same processes, and the pieces the minimal loop does not have.

    python benchmarks/bench_template_overheads.py [--repeats 24] [--syncbn off] [--model linear]

In 2 spawned gloo ranks (1 thread each), on one small_cnn 32px batch-32 DDP model with SyncBN on (or off); with
``--model linear`` the model is one Linear layer on the flattened image (no BatchNorm), so a step costs a few ms
and the extra milliseconds per step are the loop's own cost, with nothing to hide behind:

epochs (interleaved, one per repeat each, the slowest rank's time, per optimizer step):
  minimal        the loop of bench_end_to_end.py: index the in-memory tensors, forward, backward, SGD step
  template       engine.trainer.train_one_epoch and its StepEvents, the template's loader (num_workers 0, no augment),
                 optimizer, schedule, disabled GradScaler, metric logger, and the ranks' agreement (stop signal,
                 losses: one small all-reduce) every train.agree_every_steps = 10 steps
  agree every step  the template loop with train.agree_every_steps = 1: what agreeing at every step would cost
  minimal again  the minimal loop a second time, an A/A control: how far the ratio strays with no difference at all
Same model, optimizer and data objects, so launch-to-launch noise (bench_end_to_end.py's largest error) is absent.
Each loop also reports the minor page faults per step of each rank: on CPU, glibc malloc hands large freed blocks
back to the kernel and faults them in again on the next step, a cost that depends on the allocation history, not
on the work. Setting bench_end_to_end.MALLOC_TUNED in the environment takes them to 0 (the banner then shows it).

pieces (round-robin, per call, divided by a training step of the same model):
  step        one DDP training step on a fixed batch (the reference)
  agreement   start_agreement + its read for one step: one 3-float all_reduce + .tolist(), not overlapped
              here (the trainer starts it after the forward and reads it after the backward)
  loader      next() on the template's train loader; loader_aug with augmentation on (seeded per sample)
  index       the minimal loop's input: a random index into the in-memory tensors
  logger      MetricLogger.update + log_every bookkeeping (no printing: print_freq large)
  sched       LambdaLR.step of build_scheduler
  eval/epoch  engine.evaluation.evaluate over one batch per rank, divided by the 24 steps of the e2e benchmark's
              epoch (outside the template's samples_per_s, which covers training only)
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import REPO_ROOT, fmt_stat, interleaved_times, machine_banner, med, print_table, ratio_stat, run_ranks  # noqa: E402

STEPS_PER_EPOCH = 24  # bench_end_to_end.py's default suite: 1536 samples / (2 ranks x 32)


def _endless(loader):
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _counting_faults(fn, counts: list[int]):
    def run():
        before = _minor_faults()
        fn()
        counts.append(_minor_faults() - before)

    return run


def measure(rank: int, world: int, repeats: int, syncbn: bool, model_name: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from data import build_datasets
    from data.loaders import GlobalStepSampler, build_train_loader, build_val_loader
    from engine.bn import convert_sync_batchnorm
    from engine.config import load_config
    from engine.evaluation import evaluate
    from engine.inputs import InputPrep
    from engine.logging import MetricLogger
    from engine.optim import build_optimizer, build_scheduler
    from engine.runtime.agreement import StopPoll, start_agreement
    from engine.runtime.preemption import StopSignal
    from engine.step_events import StepEvents
    from engine.train_state import TrainState
    from engine.trainer import TrainLoop, train_one_epoch
    from models import build_model
    from tasks import ClassificationTask

    overrides = ["data.num_train=4096", "data.num_val=64", "train.print_freq=1000000", "train.progress_bar=false"]
    cfg = load_config(str(REPO_ROOT / "configs" / "default.yaml"), [*overrides, "data.augment=false"])
    cfg_aug = load_config(str(REPO_ROOT / "configs" / "default.yaml"), [*overrides, "data.augment=true"])
    if model_name == "linear":
        raw = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    else:
        raw = convert_sync_batchnorm(build_model(cfg.model)) if syncbn else build_model(cfg.model)
    model = DDP(raw, forward_sync_buffers=not syncbn)  # the template's buffer policy
    opt = build_optimizer(model, cfg.train, 0.05)
    sched = build_scheduler(opt, cfg.train, STEPS_PER_EPOCH)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data, data_aug = build_datasets(cfg.data, 10, 0), build_datasets(cfg_aug.data, 10, 0)
    images, labels = data.train.images, data.train.labels
    x, y = images[:32], labels[:32]
    def train_loader_of(dataset):
        sampler = GlobalStepSampler(dataset, world, rank, batch_size=cfg.data.batch_size)
        return build_train_loader(dataset, cfg.data, sampler, 0, False)

    train_loader = train_loader_of(data.train)
    batches = _endless(train_loader_of(data.train))
    batches_aug = _endless(train_loader_of(data_aug.train))
    val_loader = build_val_loader(data.val, cfg.data, rank, world, False)
    loop = TrainLoop(model, opt, sched, scaler, cfg.train, ClassificationTask(), InputPrep(torch.device("cpu")))
    events = StepEvents(cfg.train, raw, opt, STEPS_PER_EPOCH, 32 * world, StopSignal(), save=lambda state: None,
                        log_enabled=rank == 0, poll=StopPoll(cfg.dist.timeout_s))  # as step_events() builds it
    loss_sum = torch.zeros(())
    logger = MetricLogger("bench", 10**9, rank == 0, False)
    ticker = iter(logger.log_every(iter(int, 1), 10**9, 32))  # endless: one next() per step

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def minimal_epoch():
        shard = torch.randperm(len(images))[rank::world]
        for s in range(STEPS_PER_EPOCH):
            idx = shard[s * 32 : (s + 1) * 32]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()

    def template_epoch(epoch_events=events):
        train_one_epoch(loop, train_loader, TrainState(), epoch_events)

    def template_epoch_agree_every_step():
        template_epoch(dataclasses.replace(events, cfg=dataclasses.replace(cfg.train, agree_every_steps=1)))

    def index():
        idx = torch.randint(0, len(images), (32,))
        return images[idx], labels[idx]

    def log():
        next(ticker)
        logger.update(loss=1.0, lr=0.1)

    def eval_once():  # scaled to per-step below: the template evaluates once per epoch
        evaluate(raw, val_loader, ClassificationTask(), InputPrep(torch.device("cpu")), cfg.train)
        model.train()

    # order within a round: as listed, reversed every other round
    loop_fns = {"minimal": minimal_epoch, "template": template_epoch, "agree every step": template_epoch_agree_every_step,
                "minimal again": minimal_epoch}
    page_faults = {name: [] for name in loop_fns}
    loops = {name: _counting_faults(fn, page_faults[name]) for name, fn in loop_fns.items()}
    epochs = interleaved_times(loops, repeats=repeats, iters=1, device=torch.device("cpu"), barrier=dist.barrier,
                               warmup=1)
    pieces = {"step": step, "agreement": lambda: start_agreement(False, [loss_sum], [32])(), "loader": lambda: next(batches),
              "loader_aug": lambda: next(batches_aug), "index": index, "logger": log, "sched": sched.step,
              "eval/epoch": eval_once}
    times = interleaved_times(pieces, repeats=7, iters=10, device=torch.device("cpu"), barrier=dist.barrier)
    times["eval/epoch"] = [t / STEPS_PER_EPOCH for t in times["eval/epoch"]]
    return {"epochs": {k: [t / STEPS_PER_EPOCH for t in v] for k, v in epochs.items()}, "pieces": times,
            "page_faults": {k: [n / STEPS_PER_EPOCH for n in v[-repeats:]] for k, v in page_faults.items()}}


def _slowest_rank(per_rank: list[dict], key: str) -> dict[str, list[float]]:
    first = per_rank[0][key]
    return {k: [max(r[key][k][i] for r in per_rank) for i in range(len(first[k]))] for k in first}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=24, help="interleaved epochs of each loop")
    parser.add_argument("--syncbn", choices=["on", "off"], default="on")
    parser.add_argument("--model", choices=["small_cnn", "linear"], default="small_cnn")
    args = parser.parse_args()
    per_rank = run_ranks(measure, 2, args.repeats, args.syncbn == "on", args.model)
    model = "one Linear layer, no BN" if args.model == "linear" else f"small_cnn, SyncBN {args.syncbn}"
    print(machine_banner(f"setup   : 2 ranks, gloo, 1 thread each; {model}, 32px batch 32/rank; "
                         f"{args.repeats} interleaved epochs of {STEPS_PER_EPOCH} steps per loop; pieces 7 repeats"))
    epochs = _slowest_rank(per_rank, "epochs")
    rows = [[k, fmt_stat(v, 1e3, 2), fmt_stat([a - b for a, b in zip(v, epochs["minimal"])], 1e3, 3),
             fmt_stat(ratio_stat(epochs["minimal"], v), 1, 3),
             " / ".join(f"{med(r['page_faults'][k]):.0f}" for r in per_rank)] for k, v in epochs.items()]
    print_table(["loop", "ms per step", "ms over minimal", "minimal / this (throughput ratio)",
                 "page faults per step (rank 0 / 1)"], rows,
                "Template loop vs minimal loop, same processes (median [min-max])")
    t = _slowest_rank(per_rank, "pieces")
    rows = [[k, fmt_stat(v, 1e3, 3), fmt_stat(ratio_stat(v, t["step"]), 100, 2)] for k, v in t.items()]
    print_table(["piece (per optimizer step)", "ms", "% of a training step"], rows,
                "Template per-step pieces (median [min-max])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
