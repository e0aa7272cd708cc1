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
import os
import platform
import random
import sys
import time
from collections import Counter

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DataError, build_datasets
from data.loaders import build_train_loader, build_val_loader
from engine import checkpoint as ckpt
from engine.config import Config, ConfigError, config_to_dict, dump_config, load_config
from engine.distributed import (
    DistContext,
    RankZeroError,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    rank0_decides,
)
from engine.faults import FaultInjector
from engine.logging import MetricsWriter, setup_logger
from engine.optim import build_optimizer, build_scheduler, scaled_lr
from engine.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopFlags
from engine.syncbn import convert_ghost_batchnorm, convert_sync_batchnorm, sync_bn_buffers
from engine.trainer import NonFiniteLossError, TrainState, evaluate, mid_epoch_checkpoint_due, train_one_epoch
from models import ModelError, build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config file")
    # torch.distributed.launch passes --local-rank (torch>=2.0) or --local_rank (older); torchrun sets LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def prepare_output_dir(cfg: Config) -> str | None:
    """Rank 0: make ``output_dir`` writable, pick the checkpoint to resume, never clobber another run."""
    out = cfg.output_dir
    try:
        os.makedirs(os.path.join(out, ckpt.CHECKPOINT_DIR), exist_ok=True)
        probe = os.path.join(out, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"output_dir: cannot write to {out}: {exc.strerror or exc}") from None
    resume = cfg.train.resume
    if resume == "none":
        if ckpt.has_run_outputs(out):
            raise ConfigError(
                f"output_dir {out} already holds a run; set train.resume=auto to continue it or choose another output_dir"
            )
        return None
    if resume == "auto":
        path = ckpt.find_resume_checkpoint(out)
        if path is None and ckpt.has_run_outputs(out):
            ckpt_dir = os.path.join(out, ckpt.CHECKPOINT_DIR)
            names = sorted(name for name in os.listdir(ckpt_dir) if name.endswith(".pt") and not name.startswith("."))
            raise ConfigError(
                f"output_dir {out} holds a run but no loadable checkpoint in {ckpt_dir} "
                f"(unreadable: {', '.join(names) or 'none'}); move it away or choose another output_dir"
            )
        return path
    ckpt.load_checkpoint(resume)  # fail here, on rank 0, with the file's name
    own = os.path.join(os.path.abspath(out), ckpt.CHECKPOINT_DIR)
    if ckpt.has_run_outputs(out) and os.path.dirname(os.path.abspath(resume)) != own:
        # starting from another run's weights here would overwrite this run's checkpoints
        raise ConfigError(
            f"output_dir {out} already holds a run; to start from {resume} choose another output_dir "
            "(or train.resume=auto to continue the run there)"
        )
    return resume


def describe_bn(model: torch.nn.Module, cfg: Config, ctx: DistContext) -> str:
    """What BatchNorm does in this run, in words, for the banner."""
    kinds = Counter(f"{type(m).__module__}.{type(m).__name__}" for m in model.modules() if isinstance(m, _BatchNorm))
    layers = ", ".join(f"{n} x {kind}" for kind, n in kinds.items()) or "no BatchNorm layers"
    if cfg.syncbn.enabled:
        scope = f"groups of {cfg.syncbn.group_size} ranks" if cfg.syncbn.group_size else f"all {ctx.world_size} ranks"
        what = f"synchronised over {scope}" if ctx.world_size > 1 else "SyncBN on, world size 1: nothing to synchronise"
    elif cfg.syncbn.virtual_splits > 1:
        what = f"ghost BatchNorm, {cfg.syncbn.virtual_splits} virtual splits per process"
    else:
        what = f"local per process (SyncBN off), buffers made consistent by '{cfg.syncbn.buffer_policy}'"
    return f"{what} [{layers}]"


def log_banner(log, ctx: DistContext, cfg: Config, global_batch: int, lr: float, bn_mode: str) -> None:
    log.info(
        f"== DDP + SyncBN template | world size {ctx.world_size} ({ctx.launcher}) | backend {ctx.backend or 'none'} "
        f"| device {ctx.device}\n"
        f"   model {cfg.model.name} ({cfg.model.num_classes} classes) | data {cfg.data.name} | "
        f"batch {cfg.data.batch_size}/process x {ctx.world_size} x accum {cfg.train.accumulate_steps} = "
        f"{global_batch} global | lr {lr:.4g}\n"
        f"   BatchNorm: {bn_mode}\n"
        f"   torch {torch.__version__} | python {platform.python_version()} | output {cfg.output_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # 1. config: read, override, validate: before any process group, so a typo fails fast on every rank
    cfg = load_config(args.config, args.overrides)

    # 2. distributed: who am I, which device, process group, SyncBN groups
    ctx = init_distributed(cfg.dist, args.local_rank, cfg.syncbn.group_size if cfg.syncbn.enabled else 0)
    log = setup_logger(ctx.rank)
    resume_path = rank0_decides(lambda: prepare_output_dir(cfg))
    random.seed(cfg.train.seed + ctx.rank)
    torch.manual_seed(cfg.train.seed + ctx.rank)  # per rank: dropout and the like differ across ranks

    # 3. model: build, move, BatchNorm -> SyncBatchNorm (or ghost BN), then DDP
    model = build_model(cfg.model).to(ctx.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.syncbn.enabled:
        model = convert_sync_batchnorm(model, process_group=ctx.sync_group, impl=cfg.syncbn.impl)
    elif cfg.syncbn.virtual_splits > 1:
        model = convert_ghost_batchnorm(model, cfg.syncbn.virtual_splits)
    raw_model = model  # unwrapped: for state_dicts (no 'module.' prefix) and evaluation
    if ctx.is_distributed:
        # SyncBN keeps BN buffers identical on every rank, so broadcasting them each step is wasted work
        model = DDP(
            model,
            device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            forward_sync_buffers=not cfg.syncbn.enabled,
            find_unused_parameters=cfg.dist.find_unused_parameters,
        )
    if cfg.train.compile:
        model = torch.compile(model)

    # 4. data: DistributedSampler for training, an exact (unpadded) sharding for evaluation
    datasets = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)
    pin = ctx.device.type == "cuda"
    train_loader = build_train_loader(datasets.train, cfg.data, cfg.train.seed, ctx.rank, ctx.world_size, pin)
    val_loader = build_val_loader(datasets.val, cfg.data, ctx.rank, ctx.world_size, pin)
    steps_per_epoch = len(train_loader) // cfg.train.accumulate_steps
    if steps_per_epoch == 0:
        raise DataError(
            f"data: {len(datasets.train)} training samples give no full step of {cfg.data.batch_size} x "
            f"{ctx.world_size} processes x {cfg.train.accumulate_steps} accumulation; use fewer processes or a smaller batch"
        )

    # 5. train: optimizer, schedule, resume, then the epoch loop with evaluation and checkpoints
    global_batch = cfg.data.batch_size * ctx.world_size * cfg.train.accumulate_steps
    lr = scaled_lr(cfg.train, global_batch)
    optimizer = build_optimizer(raw_model, cfg.train, lr)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.amp == "fp16")
    state = TrainState()
    log_banner(log, ctx, cfg, global_batch, lr, describe_bn(raw_model, cfg, ctx))

    if resume_path is not None:
        loaded = ckpt.load_checkpoint(resume_path)
        ckpt.check_model_compatible(loaded["model"], raw_model, resume_path)
        raw_model.load_state_dict(loaded["model"])
        if cfg.train.eval_only:
            log.info(f"evaluating {resume_path}")
        else:
            warning = ckpt.check_run_compatible(
                loaded, cfg.model.name, global_batch, ctx.world_size, resume_path, optimizer=cfg.train.optimizer
            )
            if warning:
                log.warning(warning)
            optimizer.load_state_dict(loaded["optimizer"])
            scheduler.load_state_dict(loaded["scheduler"])
            scaler.load_state_dict(loaded["scaler"])
            state.load_state_dict(loaded["train_state"])
            if loaded["world_size"] == ctx.world_size:  # each rank gets back its own RNG streams
                ckpt.restore_rng_state(loaded["rng"][ctx.rank])
            log.info(f"resumed from {resume_path}: epoch {state.epoch + 1}, step {state.step}")
    if ctx.is_main and not cfg.train.eval_only:
        # only now: a refused resume (another model, another global batch) must leave the run's files untouched
        dump_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

    def consistent_bn_buffers() -> None:
        # without SyncBN each rank's running stats drift apart; agree before they are used or saved
        if not cfg.syncbn.enabled and ctx.is_distributed:
            sync_bn_buffers(raw_model, policy=cfg.syncbn.buffer_policy)

    if cfg.train.eval_only:
        consistent_bn_buffers()
        metrics = evaluate(raw_model, val_loader, ctx.device, cfg.train.amp, cfg.train.channels_last)
        log.info("eval  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return 0

    def save(is_best: bool = False) -> None:
        consistent_bn_buffers()
        rng = gather_objects(ckpt.capture_rng_state())  # a collective: every rank passes here
        if ctx.is_main:
            ckpt.save_checkpoint(
                {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "train_state": state.state_dict(),
                    "epoch": state.epoch,
                    "step": state.step,
                    "best_acc1": state.best_acc1,
                    "config": config_to_dict(cfg),
                    "world_size": ctx.world_size,
                    "global_batch": global_batch,
                    "rng": rng,
                },
                cfg.output_dir,
                keep=cfg.train.keep_checkpoints,
                is_best=is_best,
            )

    def on_step_end() -> None:
        if mid_epoch_checkpoint_due(state.step, state.epoch_step, cfg.train, steps_per_epoch):
            save()

    stop_flags = StopFlags()
    stop_flags.install()
    faults = FaultInjector(cfg.debug, ctx.rank, cfg.output_dir)
    writer = MetricsWriter(cfg.output_dir, ctx.is_main, cfg.train.tensorboard)
    run_start = time.perf_counter()
    first_epoch = state.epoch
    try:
        while state.epoch < cfg.train.epochs:
            epoch_start = time.perf_counter()
            train_loader.sampler.set_epoch(
                state.epoch, start_index=state.epoch_step * cfg.train.accumulate_steps * cfg.data.batch_size
            )
            steps_before = state.epoch_step
            stopped = train_one_epoch(
                model, train_loader, optimizer, scheduler, scaler, state, cfg.train, steps_per_epoch,
                ctx.device, stop_flags, faults, ctx.is_main, on_step_end,
            )
            if stopped:
                save()
                barrier()  # no rank exits (and makes the launcher tear the job down) before rank 0's save is on disk
                log.warning(f"stop signal received: checkpoint saved at step {state.step}; exiting {EXIT_PREEMPTED} "
                            "(relaunch the same command to resume)")
                return EXIT_PREEMPTED
            train_time = time.perf_counter() - epoch_start
            consistent_bn_buffers()
            metrics = evaluate(raw_model, val_loader, ctx.device, cfg.train.amp, cfg.train.channels_last)
            epoch_time = time.perf_counter() - epoch_start
            samples = (state.epoch_step - steps_before) * global_batch
            record = {
                "epoch": state.epoch + 1,
                "train_loss": state.loss_sum / max(state.loss_count, 1),
                **metrics,
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": samples / train_time,  # training throughput; evaluation is in epoch_time_s
                "train_time_s": train_time,
                "epoch_time_s": epoch_time,
            }
            is_best = metrics["val_acc1"] > state.best_acc1
            state.best_acc1 = max(state.best_acc1, metrics["val_acc1"])
            state.epoch, state.epoch_step, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
            save(is_best)
            writer.write(record, step=state.epoch)
            epochs_done = state.epoch - first_epoch
            eta = (time.perf_counter() - run_start) / epochs_done * (cfg.train.epochs - state.epoch)
            log.info(
                f"epoch {record['epoch']}/{cfg.train.epochs}  train_loss {record['train_loss']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  val_acc1 {metrics['val_acc1']:.2f}  "
                f"val_acc5 {metrics['val_acc5']:.2f}  lr {record['lr']:.4g}  "
                f"{record['samples_per_s']:.0f} samples/s (all processes)  epoch {epoch_time:.1f}s  eta {eta:.0f}s"
            )
    finally:
        writer.close()
        stop_flags.uninstall()
    barrier()  # leave together: a rank tearing down its process group while a peer still writes can abort in gloo
    log.info(f"done: best val_acc1 {state.best_acc1:.2f}; checkpoints in {cfg.output_dir}/{ckpt.CHECKPOINT_DIR}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` with the exit codes a scheduler understands and one-line errors instead of tracebacks."""
    user_errors = (ConfigError, DataError, ModelError, ckpt.CheckpointError, RankZeroError, NonFiniteLossError)
    try:
        return main(argv)
    except user_errors as exc:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(run())
