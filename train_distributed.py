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
import faulthandler
import os
import sys
from typing import NoReturn

from engine.config import config_text, load_config
from engine.config_reference import reference_text
from engine.runtime.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, STOP, record_exit_code


class CommandLine(argparse.ArgumentParser):
    """A bad command line is one line and exit code 2 (rank 0 says it: every rank meets it alike)."""

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message} (--help lists the options and keys)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLine(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (section.key=default), set in the YAML file or as overrides:\n"
               f"{reference_text()}\n\nMore in README.md (launching, your own model, dataset and task, outputs) and docs/.",
    )  # fmt: skip
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the file, the overrides, the defaults) as YAML and exit")
    # torch.distributed.launch passes --local-rank (torch>=2.0) or --local_rank (older); torchrun sets LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    for override in args.overrides:
        if "=" not in override:
            hint = f"; did you mean --config {override}?" if override.endswith((".yaml", ".yml")) else ""
            parser.error(f"malformed override '{override}': expected section.key=value{hint}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and a malformed command line answer at once, before torch's seconds-long import
    STOP.install()  # SIGTERM / SIGUSR1 from here on: checkpoint and exit 75, never a kill (SLURM's warning, scancel)

import random
import time
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data import build_datasets, model_inputs, with_dataset_classes
from data.loaders import (
    GlobalStepSampler,
    aspect_ratio_groups,
    build_precise_batches,
    build_train_loader,
    build_val_loader,
    num_workers,
    samples_file,
    steps_per_epoch,
)
from engine.bn import LayerCallsDiffer
from engine.checkpoint import CHECKPOINT_DIR, Checkpointer
from engine.comm import barrier, fetch_once, rank0_decides
from engine.config import global_batch_size
from engine.ema import ModelEma
from engine.errors import UserError, from_torch
from engine.evaluation import RunEvaluation
from engine.inputs import InputPrep
from engine.logging import format_metrics, log_banner, log_epoch, print_error, setup_logger
from engine.model_setup import prepare_model, running_statistics
from engine.optim import build_optimizer, build_scheduler, scaled_lr
from engine.runtime.distributed import (
    cleanup,
    collective_timed_out,
    dump_collective_trace,
    init_distributed,
    launch_world_size,
    lost_a_peer,
    set_cpu_threads,
)
from engine.runtime.rundir import announce_resume, prepare_output_dir, release_output_dirs, write_config
from engine.step_events import step_events
from engine.train_state import TrainState
from engine.trainer import TrainLoop, train_one_epoch
from models import build_model
from models.pretrained import fetch_weights
from tasks import build_task


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # 1. config: read, override, validate: before any process group, so a typo fails fast on every rank
    # (a timm model brings its input size and normalisation for the data keys the config leaves unset)
    cfg = load_config(args.config, args.overrides, launch_world_size(args.local_rank), defaults=model_inputs)
    cfg = with_dataset_classes(cfg)  # model.num_classes 0: the dataset's count (an image folder's class folders)
    if args.print_config:
        print(config_text(cfg), end="")
        return 0

    # 2. distributed: this process's rank and device from its launcher (torchrun's LOCAL_RANK, SLURM, --local_rank),
    # torch.cuda.set_device(local_rank), then dist.init_process_group(NCCL on GPUs, gloo on CPUs; dist.timeout_s)
    ctx = init_distributed(cfg.dist, args.local_rank, cfg.syncbn.group_size if cfg.syncbn.enabled else 0, cfg.output_dir)
    set_cpu_threads(num_workers(cfg.data))  # the CPUs this process may use, less its loader workers' (OMP_NUM_THREADS wins)
    log = setup_logger(ctx.rank)  # rank 0 prints
    resume_path = rank0_decides(partial(prepare_output_dir, cfg))  # rank 0 looks; every rank resumes the same
    random.seed(cfg.train.seed + ctx.rank)
    torch.manual_seed(cfg.train.seed + ctx.rank)  # per rank: dropout and the like differ across ranks

    # 3. model: build, BatchNorm -> SyncBatchNorm (or ghost BN), move to the device, then DDP
    if cfg.model.pretrained:  # the weights fetched once a node, the other ranks waiting (no process group otherwise)
        fetch_once(partial(fetch_weights, cfg.model, cfg.task, log.info), ctx.local_rank)
    model = prepare_model(build_model(cfg.model, cfg.task), cfg, ctx)  # convert_sync_batchnorm(model).to(device)
    raw_model = model  # unwrapped: for state_dicts (no 'module.' prefix) and evaluation
    if ctx.is_distributed:
        # SyncBN keeps BN buffers identical on every rank, so broadcasting them each step is wasted work
        model = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                    forward_sync_buffers=not cfg.syncbn.enabled, find_unused_parameters=cfg.dist.find_unused_parameters)
    if cfg.train.compile:
        model = torch.compile(model)

    # 4. data: a DistributedSampler for training (whose global steps are the same samples at any world size), an
    # exact (unpadded) sharding for evaluation
    datasets = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed)
    task = build_task(cfg, datasets.ground_truth)  # the loss of a batch, the validation scores (tasks/)
    datasets.train = task.training_split(datasets.train)  # a training sample as the task sees it (contrastive: 2 views)
    train_sampler = GlobalStepSampler(
        datasets.train, ctx.world_size, ctx.rank, cfg.train.seed, cfg.data.drop_last, batch_size=cfg.data.batch_size,
        accumulate_steps=cfg.train.accumulate_steps,
        groups=aspect_ratio_groups(datasets.train, cfg.data.aspect_ratio_group_factor),  # detection: one shape a step
        record=samples_file(cfg, ctx.rank),  # debug.record_samples (tests): the indices this rank trains on
    )
    pin = ctx.device.type == "cuda"  # page-locked batches: faster copies to the GPU
    train_loader = build_train_loader(datasets.train, cfg.data, train_sampler, cfg.train.seed, pin)
    val_loader = build_val_loader(datasets.val, cfg.data, ctx.rank, ctx.world_size, pin)
    # uint8 images become float, normalised and channels_last on the device, once per batch
    inputs = InputPrep(ctx.device, *datasets.mean_std, channels_last=cfg.train.channels_last)

    # 5. optimizer, learning-rate schedule (per step), gradient scaler (fp16), EMA of the weights
    steps = steps_per_epoch(train_loader, cfg.train.accumulate_steps)
    optimizer = build_optimizer(raw_model, cfg.train, scaled_lr(cfg.train, global_batch_size(cfg, ctx.world_size)))
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.amp == "fp16")
    ema = ModelEma(raw_model, cfg.train) if cfg.train.ema_decay and not cfg.train.eval_only else None

    # 6. evaluation and checkpoints, both with settled BatchNorm running statistics (PreciseBN, or the ranks'
    # agreement), then resume
    precise_batches = build_precise_batches(datasets.train, cfg, ctx.rank, ctx.world_size, pin, inputs)
    bn_stats = running_statistics(cfg, ctx.world_size, raw_model, ema, log.info, task, precise_batches)
    evaluator = RunEvaluation(val_loader, task, inputs, cfg.train, bn_stats, raw_model, ema)  # exact, on all ranks
    checkpointer = Checkpointer(cfg, ctx, raw_model, optimizer, scheduler, scaler, ema, datasets.inference())
    state = TrainState()  # epoch, step, best metric: what a resume continues from
    log_banner(ctx, cfg, raw_model)
    if cfg.train.eval_only:
        if resume_path is not None:
            checkpointer.load_model(resume_path)
            log.info(f"evaluating {resume_path}")
        log.info(f"eval  {format_metrics(evaluator(state.step))}")
        return 0
    if resume_path is not None:
        checkpointer.resume(resume_path, state)
        announce_resume(cfg, resume_path, state, ctx.is_main)
    if state.epoch >= cfg.train.epochs:
        return 0  # a finished run: it said so, and how to train longer
    write_config(cfg, ctx.is_main)  # only now: a refused resume must leave the run's files untouched

    # 7. the epoch loop: train, evaluate, checkpoint, log
    loop = TrainLoop(model, optimizer, scheduler, scaler, cfg.train, task, inputs)  # what a training step needs
    run_start, first_epoch = time.perf_counter(), state.epoch
    # stop signals, the watchdog, logs and trackers, the ranks' agreement, EMA updates, mid-epoch checkpoints
    with step_events(checkpointer, bn_stats, state, steps) as events:
        if events.stopped_before_training():  # a stop signal during set-up: nothing trained since the checkpoint
            log.warning(f"stop signal received before the first step; exiting {EXIT_PREEMPTED} (relaunch the same "
                        "command to resume)")
            return EXIT_PREEMPTED
        while state.epoch < cfg.train.epochs:
            train_sampler.set_epoch(state.epoch, start_step=state.epoch_step)  # a resume continues at its sample
            if train_one_epoch(loop, train_loader, state, events):  # the ranks agreed to stop (SIGTERM, SIGUSR1)
                events.save(state)
                barrier()  # no rank exits (and makes the launcher tear the job down) before rank 0's save is on disk
                log.warning(f"stop signal received: checkpoint saved at step {state.step}; exiting {EXIT_PREEMPTED} "
                            "(relaunch the same command to resume)")
                return EXIT_PREEMPTED
            evaluation_start = time.perf_counter()
            metrics = {
                "epoch": state.epoch + 1,
                "train_loss": state.train_loss,
                **evaluator(state.step),
                "lr": optimizer.param_groups[0]["lr"],
                # training only, over every start that trained part of this epoch
                "samples_per_s": state.epoch_step * checkpointer.global_batch / state.epoch_train_time_s,
                "train_time_s": state.epoch_train_time_s,
                "epoch_time_s": state.epoch_train_time_s + time.perf_counter() - evaluation_start,  # and evaluation
            }
            is_best = state.finish_epoch(metrics, cfg.train.best_metric)
            events.save(state, is_best)
            events.writer.write(metrics, step=state.epoch)
            per_epoch = (time.perf_counter() - run_start) / (state.epoch - first_epoch)
            log_epoch(metrics, cfg.train.epochs, eta_s=per_epoch * (cfg.train.epochs - state.epoch))
    barrier()  # leave together: a rank tearing down its process group while a peer still writes can abort in gloo
    log.info(f"done: best {state.best_metric} {state.best_value:.2f}; checkpoints in {cfg.output_dir}/{CHECKPOINT_DIR}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` with the exit codes a scheduler understands and one-line errors instead of tracebacks."""
    code = _run(argv)
    record_exit_code(code)  # for the launch scripts: torchrun itself reports 1 for any worker's non-zero code
    return code


def _run(argv: list[str] | None) -> int:
    STOP.install()  # (already, when run as a script: before torch's import)
    faulthandler.enable(all_threads=True)  # a native abort (a collective library, a kernel) shows each thread's stack
    try:
        return main(argv)
    except UserError as exc:
        print_error(str(exc), exc.same_on_every_rank)
        return 1
    except LayerCallsDiffer as exc:  # a model that calls SyncBN layers by the data (syncbn.check_calls): all ranks
        print_error(str(exc), same_on_every_rank=True)
        return 1
    except (RuntimeError, ValueError, AssertionError) as exc:  # AssertionError: torchvision's ViT refusing a size
        if lost_a_peer(exc) or collective_timed_out(exc):
            traces = dump_collective_trace()  # which collective this rank was in, beside the other ranks' traces
            where = f"; this rank's collectives: {traces}" if traces else ""
            if lost_a_peer(exc):
                print_error(f"another process of the job ended first (its error is above; torchrun's summary names it){where}")
            else:
                print_error(f"a collective waited dist.timeout_s for a rank that did not come{where} (python -m "
                            f"torch.distributed.flight_recorder.fr_trace {traces or 'DIR'} -p rank_ compares the ranks)")
            return 1
        error = from_torch(exc)  # a torch error that means the input is wrong: one line naming the keys
        if error is None:
            raise
        print_error(str(error), error.same_on_every_rank)
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: rank 0 says it once
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: the same command resumes from the last checkpoint (what trained since is lost; "
                  "SIGTERM or SIGUSR1 checkpoint before stopping)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        release_output_dirs()  # a start that failed leaves no run-looking directory behind
        cleanup()


if __name__ == "__main__":
    sys.exit(run())
