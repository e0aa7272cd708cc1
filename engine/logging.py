"""Rank-0 console, progress bar, ``metrics.jsonl`` and the trackers (TensorBoard, ...): all output goes through here.

Other ranks log errors only, so an 8-GPU job prints one story, not eight.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from engine.config import Config, TrainConfig, global_batch_size, normalisation_batch, task_of
from engine.errors import UserError
from engine.grad_checkpointing import CheckpointedSequential
from engine.optim import scaled_lr
from engine.runtime.distributed import DistContext, launch_rank, record_error_for_launcher
from engine.trackers import Trackers
from engine.train_state import TrainState

LOGGER_NAME = "ddp"


def setup_logger(rank: int) -> logging.Logger:
    """The one logger: INFO on rank 0, errors only elsewhere (tagged with the rank)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def print_error(message: str, same_on_every_rank: bool = False) -> None:
    """The one-line error of a rank on its way out: ``error: ...`` on rank 0, ``error (rank r): ...`` elsewhere;
    printed once (by rank 0) when every rank meets it alike, and handed to torchrun's failure summary."""
    rank = launch_rank()
    line = f"error{'' if rank == 0 else f' (rank {rank})'}: {message}"
    record_error_for_launcher(line)
    if rank == 0 or not same_on_every_rank:
        print(line, file=sys.stderr, flush=True)


def exit_code(body: Callable[[], object]) -> int:
    """A script's exit code: 0 when ``body`` returns, 1 with the one-line error when it meets a user error (any other
    exception keeps its traceback)."""
    try:
        body()
        return 0
    except UserError as exc:
        print_error(str(exc), exc.same_on_every_rank)
        return 1


def log_banner(ctx: DistContext, cfg: Config, model: torch.nn.Module) -> None:
    """Who runs what, on rank 0: world, launcher, backend, device, batches, lr (as scaled), what BatchNorm does,
    versions."""
    lr = scaled_lr(cfg.train, global_batch_size(cfg, ctx.world_size))
    per_node = f"{ctx.local_world_size} per node | " if ctx.local_world_size != ctx.world_size else ""
    get_logger().info(
        f"== DDP + SyncBN template | world size {ctx.world_size} ({ctx.launcher}) | {per_node}"
        f"backend {ctx.backend or 'none'} | device {ctx.device}\n"
        f"   {cfg.task} | model {cfg.model.name} ({cfg.model.num_classes} classes, "
        f"{'pretrained' if cfg.model.pretrained else 'from scratch'}) | data {cfg.data.name}, {_image_size(cfg, model)} | "
        f"batch {cfg.data.batch_size}/process x {ctx.world_size} x accum {cfg.train.accumulate_steps} = "
        f"{global_batch_size(cfg, ctx.world_size)} global | lr {_describe_lr(cfg.train, lr)}\n"
        f"   BatchNorm: {_describe_bn(model, cfg, ctx)}\n"
        f"{_describe_checkpointing(model)}"
        f"   torch {torch.__version__} | python {platform.python_version()} | {_describe_threads()} | "
        f"output {cfg.output_dir}"
    )
    _warn_far_smaller_images(cfg, model)


def _describe_lr(train: TrainConfig, lr: float) -> str:
    """The rate in use and where it comes from: a recipe ported from a trainer whose --lr is absolute (torchvision's,
    timm's) sets train.lr_scaling: none."""
    if train.lr_scaling == "none":
        return f"{lr:.4g} (train.lr as written)"
    return (f"{lr:.4g} (train.lr {train.lr:g} per {train.base_batch_size} samples, scaled {train.lr_scaling}; "
            "train.lr_scaling: none takes it as written)")


def _image_size(cfg: Config, model: torch.nn.Module) -> str:
    """The images the model sees: classification's side, segmentation's training crop (and its evaluation size), the
    short side a detector resizes to (torchvision's ``transform``: several in training is scale jitter)."""
    resize, family = getattr(model, "transform", None), task_of(cfg).model_family
    if family == "detection" and hasattr(resize, "min_size"):
        sides = "/".join(map(str, resize.min_size))
        return f"short side {sides} px (max {resize.max_size}), resized by the model"
    if family == "segmentation":
        evaluation = f"short side {cfg.data.base_size}" if cfg.data.base_size else "as stored"
        return f"{cfg.data.image_size} px crops, evaluated {evaluation}"
    train, evaluation = cfg.data.train_crop_size or cfg.data.image_size, cfg.data.val_crop_size or cfg.data.image_size
    return f"{train} px" if train == evaluation else f"{train} px crops, evaluated at {evaluation} px"


def _warn_far_smaller_images(cfg: Config, model: torch.nn.Module) -> None:
    """A classifier fed images a quarter of the size it was made for, or less (a timm model says its size: its
    ``pretrained_cfg``), may not learn at all: ``timm/efficientnet_b0`` on the default job's 32 px ends at chance (20 %
    at a tenth of the rate), at 64 px at 96 % (BENCHMARKS §14). Image folders take the model's size unless the config
    sets one (``data/model_inputs.py``); generated data and CIFAR keep their own, so this says it."""
    made_for = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (0,))[-1]
    side = cfg.data.train_crop_size or cfg.data.image_size
    if task_of(cfg).model_family != "classification" or "img_size" in cfg.model.kwargs or side * 4 > made_for:
        return
    features = getattr(model, "feature_info", None)
    reduction = features[-1].get("reduction") if isinstance(features, list) and features else None
    final = max(side // reduction, 1) if reduction else 0  # the side of its last feature map
    last = f" (its last feature map is {final}x{final})" if final else ""
    get_logger().warning(f"warning: {cfg.model.name} was made for {made_for} px images and gets {side} px{last}: it "
                         f"may not learn at this size; set data.image_size (its own {made_for}, or more than "
                         f"{made_for // 4})")


def _describe_threads() -> str:
    source = "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "its CPUs less its loader workers"
    return f"{torch.get_num_threads()} CPU threads per process ({source})"


def _describe_bn(model: torch.nn.Module, cfg: Config, ctx: DistContext) -> str:
    kinds = Counter(f"{type(m).__module__}.{type(m).__name__}" for m in model.modules() if isinstance(m, _BatchNorm))
    layers = ", ".join(f"{n} x {kind}" for kind, n in kinds.items()) or "no BatchNorm layers"
    frozen = sum(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())  # torchvision's, not _BatchNorm
    if frozen:
        layers += f"; {frozen} x FrozenBatchNorm2d, fixed statistics (model.unfreeze_bn makes them BatchNorm)"
    if cfg.syncbn.enabled:
        scope = f"groups of {cfg.syncbn.group_size} ranks" if cfg.syncbn.group_size else f"all {ctx.world_size} ranks"
        what = f"synchronised over {scope}" if ctx.world_size > 1 else "SyncBN on, world size 1: nothing to synchronise"
    elif cfg.syncbn.virtual_splits > 1:
        what = f"ghost BatchNorm, {cfg.syncbn.virtual_splits} virtual splits per process"
    else:
        what = f"local per process (SyncBN off), buffers made consistent by '{cfg.syncbn.buffer_policy}'"
    return f"normalisation batch {normalisation_batch(cfg, ctx.world_size)}: {what} [{layers}]"


def _describe_checkpointing(model: torch.nn.Module) -> str:
    """The banner's line for ``train.grad_checkpointing``: which blocks recompute in backward (none: no line)."""
    parts = [name or "the model" for name, m in model.named_modules()
             if isinstance(m, CheckpointedSequential) or getattr(m, "grad_checkpointing", None) is True]  # fmt: skip
    return f"   activation checkpointing: {', '.join(parts)} (BatchNorm statistics exact under the recompute)\n" if parts else ""


def log_epoch(record: dict[str, Any], epochs: int, eta_s: float) -> None:
    """The epoch line: losses, the task's scores (and the EMA's), lr, throughput of all processes, time, ETA."""
    scores = {key: value for key, value in record.items() if key.startswith("val_")}
    get_logger().info(
        f"epoch {record['epoch']}/{epochs}  train_loss {record['train_loss']:.4f}  {format_metrics(scores)}  "
        f"lr {record['lr']:.4g}  {record['samples_per_s']:.0f} samples/s (all processes)  "
        f"epoch {record['epoch_time_s']:.1f}s  eta {eta_s:.0f}s"
    )


def format_metrics(metrics: dict[str, Any]) -> str:
    """``val_loss 0.1234  val_acc1 56.78 ...``: the scalar scores (per-class lists go to metrics.jsonl and
    TensorBoard only)."""
    return "  ".join(f"{key} {value:.4f}" if "loss" in key else f"{key} {value:.2f}"
                     for key, value in metrics.items() if isinstance(value, float))


class SmoothedValue:
    """A windowed median/average plus the global average of a series (torchvision's, trimmed)."""

    def __init__(self, window: int = 20, fmt: str = "{median:.4g} ({global_avg:.4g})") -> None:
        self.deque: deque[float] = deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return sorted(self.deque)[len(self.deque) // 2] if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Iterates a loader and reports value, average, ETA, throughput, data time and max memory on rank 0.

    On a terminal it draws a tqdm bar; otherwise (CI, log files) it prints one line every ``print_freq`` steps.
    """

    def __init__(self, header: str, print_freq: int, enabled: bool, progress_bar: bool) -> None:
        self.meters: dict[str, SmoothedValue] = {}
        self.header, self.print_freq, self.enabled = header, print_freq, enabled
        self.use_bar = enabled and progress_bar and sys.stderr.isatty()

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters.setdefault(name, SmoothedValue()).update(float(value))

    def __str__(self) -> str:
        return "  ".join(f"{name} {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, total: int, batch_size: int) -> Iterator:
        iter_time, data_time = SmoothedValue(fmt="{avg:.3f}"), SmoothedValue(fmt="{avg:.3f}")
        bar = None
        if self.use_bar:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=self.header, dynamic_ncols=True, leave=False)
        end = time.perf_counter()
        for i, obj in enumerate(iterable):
            data_time.update(time.perf_counter() - end)
            yield obj
            iter_time.update(time.perf_counter() - end)
            end = time.perf_counter()
            if not self.enabled:
                continue
            rate = batch_size / max(iter_time.avg, 1e-9)
            if bar is not None:
                bar.set_postfix_str(f"{self}  {rate:.0f} samples/s/process", refresh=False)
                bar.update(1)
            elif i % self.print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                get_logger().info(
                    f"{self.header} [{i + 1}/{total}]  eta {eta}  {self}  {rate:.0f} samples/s/process  "
                    f"time {iter_time}  data {data_time}{_max_memory()}"
                )
        if bar is not None:
            bar.close()


def _max_memory() -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"  max mem {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return ""


class MetricsWriter:
    """One JSON object per epoch in ``metrics.jsonl``, and the same values, plus per-step ones, to the trackers
    ``train.trackers`` names (TensorBoard by default: ``engine/trackers.py``); a no-op off rank 0. ``state``: the
    run's, whose tracker runs a resume continues."""

    def __init__(self, cfg: Config, enabled: bool, state: TrainState) -> None:
        self.enabled = enabled
        self.path = metrics_path(cfg.output_dir)
        self.trackers = Trackers(cfg, state, get_logger().warning) if enabled else None

    def write(self, record: dict[str, Any], step: int) -> None:
        """The record of epoch ``step`` (1-based: the epochs finished)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log_epoch(record, step)

    def add_step(self, step: int, **values: float) -> None:
        """Per-step values (``step/<name>``, x = optimizer steps): loss, lr, throughput of all processes."""
        if self.trackers is not None:
            self.trackers.log_step(values, step)

    def close(self, failed: bool = False) -> None:
        if self.trackers is not None:
            self.trackers.close(failed)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))


def metrics_path(output_dir: str) -> str:
    return os.path.join(output_dir, "metrics.jsonl")


def restore_metrics(output_dir: str, history: list[dict[str, Any]], finished_epochs: int) -> None:
    """Make ``metrics.jsonl`` hold exactly one line per finished epoch, in order, after a resume (rank 0).

    ``history`` is the resumed checkpoint's record of each finished epoch: a line the kill prevented comes back
    from it, and a line written after that checkpoint (its epoch runs again) is dropped. A checkpoint from before
    records travelled in checkpoints has no history: the file's own lines of the finished epochs are kept.
    """
    path = metrics_path(output_dir)
    records: dict[int, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line torn by a kill
                    record = json.loads(line)
                    records[int(record["epoch"])] = record
    records.update({int(r["epoch"]): r for r in history})
    kept = [records[epoch] for epoch in sorted(records) if epoch <= finished_epochs]
    if not kept and not os.path.exists(path):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(tmp, path)
