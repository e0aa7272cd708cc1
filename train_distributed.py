"""DDP + SyncBatchNorm training, one process per device, configured by YAML.

    python train_distributed.py --config configs/default.yaml                 # one process
    torchrun --standalone --nproc_per_node=8 train_distributed.py --config configs/imagenet_resnet50.yaml
    python -m torch.distributed.launch --nproc_per_node=2 train_distributed.py --config ...   # legacy
    srun python train_distributed.py --config ...                             # SLURM

Overrides follow the config: ``train.epochs=3 data.batch_size=16``. The run, top to bottom:
config -> distributed -> model (BatchNorm -> SyncBatchNorm -> DDP) -> data -> train/eval/checkpoint -> teardown.
"""

from __future__ import annotations

import argparse
import sys

from engine.config import load_config, reference_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (section.key=default), set in the YAML file or as overrides:\n"
               f"{reference_text()}\n\nMore in README.md: launching, your own model and dataset, outputs.",
    )  # fmt: skip
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config file")
    # torch.distributed.launch passes --local-rank (torch>=2.0) or --local_rank (older); torchrun sets LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a malformed command line answer at once, before torch's seconds-long import

import random
import time
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data import build_datasets
from data.loaders import build_precise_loader, build_train_loader, build_val_loader, steps_per_epoch
from engine.checkpoint import CHECKPOINT_DIR, Checkpointer, prepare_output_dir
from engine.config import global_batch_size
from engine.distributed import barrier, cleanup, init_distributed, launch_world_size, lost_a_peer, rank0_decides
from engine.ema import ModelEma, evaluate_ema
from engine.errors import UserError
from engine.faults import FaultInjector
from engine.logging import MetricsWriter, format_metrics, log_banner, log_epoch, print_error, setup_logger
from engine.optim import build_optimizer, build_scheduler, scaled_lr
from engine.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopSignal
from engine.syncbn import convert_ghost_batchnorm, convert_sync_batchnorm
from engine.tasks import build_task
from engine.trainer import TrainLoop, TrainState, evaluate, settle_bn_statistics, train_one_epoch
from engine.watchdog import watch_steps
from models import build_model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # 1. config: read, override, validate: before any process group, so a typo fails fast on every rank
    cfg = load_config(args.config, args.overrides, launch_world_size(args.local_rank))

    # 2. distributed: who am I, which device, process group, SyncBN groups; rank 0 decides what to resume
    ctx = init_distributed(cfg.dist, args.local_rank, cfg.syncbn.group_size if cfg.syncbn.enabled else 0)
    log = setup_logger(ctx.rank)
    resume_path = rank0_decides(partial(prepare_output_dir, cfg))
    random.seed(cfg.train.seed + ctx.rank)
    torch.manual_seed(cfg.train.seed + ctx.rank)  # per rank: dropout and the like differ across ranks

    # 3. model: build, move, BatchNorm -> SyncBatchNorm (or ghost BN), then DDP
    task = build_task(cfg)  # classification or segmentation: the loss of a batch, the validation scores
    model = build_model(cfg.model, cfg.task).to(ctx.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.syncbn.enabled:
        model = convert_sync_batchnorm(model, ctx.sync_group, impl=cfg.syncbn.impl, collective=cfg.syncbn.collective)
    elif cfg.syncbn.virtual_splits > 1:
        model = convert_ghost_batchnorm(model, cfg.syncbn.virtual_splits)
    raw_model = model  # unwrapped: for state_dicts (no 'module.' prefix) and evaluation
    if ctx.is_distributed:
        # SyncBN keeps BN buffers identical on every rank, so broadcasting them each step is wasted work
        model = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                    forward_sync_buffers=not cfg.syncbn.enabled, find_unused_parameters=cfg.dist.find_unused_parameters)
    if cfg.train.compile:
        model = torch.compile(model)

    # 4. data: DistributedSampler for training, an exact (unpadded) sharding for evaluation
    datasets = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)
    pin = ctx.device.type == "cuda"
    train_loader = build_train_loader(datasets.train, cfg.data, cfg.train.seed, ctx.rank, ctx.world_size, pin)
    val_loader = build_val_loader(datasets.val, cfg.data, ctx.rank, ctx.world_size, pin)
    precise_loader = build_precise_loader(datasets.train, cfg, ctx.rank, ctx.world_size, pin)  # None: not needed
    score = partial(evaluate, loader=val_loader, task=task, device=ctx.device, cfg=cfg.train)  # exact, all ranks

    # 5. train: optimizer and schedule, resume, then the epoch loop: train, evaluate, checkpoint, log
    global_batch, steps = global_batch_size(cfg, ctx.world_size), steps_per_epoch(train_loader, cfg.train.accumulate_steps)
    lr = scaled_lr(cfg.train, global_batch)
    optimizer = build_optimizer(raw_model, cfg.train, lr)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.amp == "fp16")
    ema = ModelEma(raw_model, cfg.train) if cfg.train.ema_decay else None
    checkpointer = Checkpointer(cfg, ctx, raw_model, optimizer, scheduler, scaler, ema)
    state = TrainState()
    log_banner(ctx, cfg, raw_model, lr)
    if cfg.train.eval_only:
        if resume_path is not None:
            checkpointer.load_model(resume_path)
            log.info(f"evaluating {resume_path}")
        settle_bn_statistics(raw_model, cfg.syncbn, precise_loader)
        log.info(f"eval  {format_metrics(score(raw_model))}")
        return 0
    if resume_path is not None:
        checkpointer.resume(resume_path, state)
    if state.epoch >= cfg.train.epochs:
        return 0  # a finished run: the checkpointer said so, and how to train longer
    checkpointer.write_config()  # only now: a refused resume must leave the run's files untouched

    run_start, first_epoch = time.perf_counter(), state.epoch
    with (
        StopSignal() as stop,
        MetricsWriter(cfg.output_dir, ctx.is_main, cfg.train.tensorboard) as writer,
        watch_steps(cfg.dist.step_timeout_s),  # a rank stuck outside collectives ends the job, naming itself
    ):
        loop = TrainLoop(model, optimizer, scheduler, scaler, cfg.train, task, ctx.device, steps, global_batch,
                         ctx.is_main, checkpointer, writer, ema,
                         FaultInjector.from_config(cfg.debug, ctx.rank, cfg.output_dir))
        while state.epoch < cfg.train.epochs:
            epoch_start = time.perf_counter()
            trained = train_one_epoch(loop, train_loader, state, stop)
            if trained.stopped:
                checkpointer.save(state)
                barrier()  # no rank exits (and makes the launcher tear the job down) before rank 0's save is on disk
                log.warning(f"stop signal received: checkpoint saved at step {state.step}; exiting {EXIT_PREEMPTED} "
                            "(relaunch the same command to resume)")
                return EXIT_PREEMPTED
            settle_bn_statistics(raw_model, cfg.syncbn, precise_loader)
            metrics = score(raw_model)
            if ema is not None:
                metrics |= evaluate_ema(ema, score, precise_loader, cfg)
            record = {
                "epoch": state.epoch + 1,
                "train_loss": state.train_loss,
                **metrics,
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": trained.steps * global_batch / trained.seconds,  # training only
                "train_time_s": trained.seconds,
                "epoch_time_s": time.perf_counter() - epoch_start,  # training and evaluation
            }
            is_best = state.finish_epoch(record, cfg.train.best_metric)
            checkpointer.save(state, is_best)
            writer.write(record, step=state.epoch)
            per_epoch = (time.perf_counter() - run_start) / (state.epoch - first_epoch)
            log_epoch(record, cfg.train.epochs, eta_s=per_epoch * (cfg.train.epochs - state.epoch))
    barrier()  # leave together: a rank tearing down its process group while a peer still writes can abort in gloo
    log.info(f"done: best {cfg.train.best_metric} {state.best_acc1:.2f}; checkpoints in {cfg.output_dir}/{CHECKPOINT_DIR}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` with the exit codes a scheduler understands and one-line errors instead of tracebacks."""
    try:
        return main(argv)
    except UserError as exc:
        print_error(str(exc), exc.same_on_every_rank)
        return 1
    except RuntimeError as exc:
        if not lost_a_peer(exc):
            raise
        print_error("another process of the job ended first (its error is above; torchrun's summary names it)")
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(run())
