"""The train step and epoch loop, where training stands (``TrainState``), and exact distributed evaluation."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from engine.agreement import Agreement, LossWindow, agree_after_step, mid_epoch_checkpoint_due
from engine.config import SyncBNConfig, TrainConfig
from engine.errors import DataError, NonFiniteLossError
from engine.faults import FaultInjector
from engine.logging import MetricLogger, get_logger
from engine.preemption import StopSignal
from engine.syncbn import check_values_per_channel, recompute_bn_stats, sync_bn_buffers
from engine.tasks import Task
from engine.watchdog import enter, progress

if TYPE_CHECKING:
    from engine.checkpoint import Checkpointer
    from engine.ema import ModelEma
    from engine.logging import MetricsWriter


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so a resume continues at the same sample.

    It changes only through its methods: one optimizer step done, one epoch done.
    """

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # optimizer steps done since the start of training
    epoch_step: int = 0  # optimizer steps done within ``epoch``
    best_acc1: float = -1.0  # the best value of train.best_metric so far
    loss_sum: float = 0.0  # global (all ranks) train-loss sum of ``epoch`` so far
    loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch (metrics.jsonl)

    def finish_step(self, agreed: Agreement | None) -> None:
        """One optimizer step done; ``agreed`` (when the ranks agreed in it) brings the global losses since the last."""
        self.step += 1
        self.epoch_step += 1
        if agreed is not None:
            self.loss_sum += sum(agreed.loss_sums)
            self.loss_count += sum(agreed.counts)

    def finish_epoch(self, record: dict[str, Any], best_metric: str = "val_acc1") -> bool:
        """The epoch in progress is done and evaluated (``record``: its metrics line); returns whether it is the
        best so far by ``best_metric`` (its best value is kept in ``best_acc1``). The record travels in every later
        checkpoint, so a resume can restore ``metrics.jsonl``."""
        is_best = record[best_metric] > self.best_acc1
        self.best_acc1 = max(self.best_acc1, record[best_metric])
        self.epoch, self.epoch_step, self.loss_sum, self.loss_count = self.epoch + 1, 0, 0.0, 0
        self.history.append(record)
        return is_best

    @property
    def train_loss(self) -> float:
        """Mean training loss of the epoch so far, over every sample of every rank."""
        return self.loss_sum / max(self.loss_count, 1)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():  # a checkpoint from before ``history`` existed keeps the default
            setattr(self, key, value)


@dataclass
class TrainLoop:
    """What the training loop needs, built once by the entry script and handed to every epoch."""

    model: nn.Module  # as trained: wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    task: Task  # the loss of a batch
    device: torch.device
    steps_per_epoch: int
    global_batch: int  # samples per optimizer step over all processes
    log_enabled: bool = True  # rank 0 prints the step lines
    checkpointer: Checkpointer | None = None  # for mid-epoch checkpoints (train.checkpoint_every_steps)
    writer: MetricsWriter | None = None  # per-step TensorBoard scalars every train.print_freq steps (rank 0)
    ema: ModelEma | None = None  # updated after every train.ema_every optimizer steps
    faults: FaultInjector | None = None  # test-only fault injection (debug.*)


@dataclass(frozen=True)
class EpochResult:
    stopped: bool  # a stop signal ended the epoch early (a checkpoint is due before exiting)
    steps: int  # optimizer steps run (fewer than an epoch after a resume or a stop)
    seconds: float


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _autocast(device: torch.device, amp: str):
    dtype = amp_dtype(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _to_device(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last and batch.ndim == 4 else torch.preserve_format
    return batch.to(device, non_blocking=True, memory_format=memory_format)


def train_one_epoch(loop: TrainLoop, loader: DataLoader, state: TrainState, stop: StopSignal) -> EpochResult:
    """Run the optimizer steps left in ``state.epoch`` (from ``state.epoch_step`` on, so a resume continues at
    the same sample); ends early, with ``stopped``, when the ranks agree that a stop signal arrived."""
    cfg, model, accum = loop.cfg, loop.model, loop.cfg.accumulate_steps
    start, steps_before = time.perf_counter(), state.epoch_step
    model.train()
    loader.sampler.set_epoch(state.epoch, start_index=state.epoch_step * accum * loader.batch_size)
    micro_batches = (loop.steps_per_epoch - state.epoch_step) * accum
    metric_logger = MetricLogger(f"epoch {state.epoch + 1}/{cfg.epochs}", cfg.print_freq, loop.log_enabled,
                                 cfg.progress_bar)
    window = LossWindow(loop.device)
    tb_since = (state.step, start)  # step and time of the last per-step TensorBoard point
    batches = itertools.islice(loader, micro_batches)
    enter("loading data", in_collective=False, step=state.step)
    for i, (images, targets) in enumerate(metric_logger.log_every(batches, micro_batches, loader.batch_size)):
        enter("in the step, outside collectives", in_collective=False)
        if loop.faults is not None and i % accum == 0:
            loop.faults.before_step(state.step)
        enter("in forward/backward (SyncBN, gradient all-reduce) or the ranks' agreement", in_collective=True)
        images, targets = _to_device(images, loop.device, cfg.channels_last), targets.to(loop.device, non_blocking=True)
        last_micro_step = (i + 1) % accum == 0
        # gradients are all-reduced only on the micro-step that ends an accumulation window
        sync_context = nullcontext() if last_micro_step or not isinstance(model, DDP) else model.no_sync()
        pending = None
        with sync_context:
            with _autocast(loop.device, cfg.amp), _one_value_per_channel_is_a_data_error():
                loss = loop.task.loss(model(images), targets)
            if loop.faults is not None:
                loss = loop.faults.corrupt_loss(loss, state.step)
            window.add(loss, len(targets))
            if last_micro_step:
                window.end_step()
                first_step = i + 1 == accum
                if first_step or agree_after_step(state.step + 1, state.epoch_step + 1, cfg, loop.steps_per_epoch):
                    pending = window.start_agreement(stop.requested)  # overlaps the backward below
            loop.scaler.scale(loss / accum).backward()
        if not last_micro_step:
            enter("loading data", in_collective=False)
            continue

        agreed = pending() if pending is not None else None
        enter("in the optimizer step", in_collective=False)
        if agreed is not None:
            _check_agreed(agreed, state, model)
        _optimizer_step(loop)
        state.finish_step(agreed)
        if loop.ema is not None:
            loop.ema.update(state.step)
        progress()
        lr = loop.optimizer.param_groups[0]["lr"]
        if agreed is not None:
            _log_losses(loop, metric_logger, agreed, state.step)
        metric_logger.update(lr=lr)
        if loop.writer is not None and state.step % cfg.print_freq == 0:
            now = time.perf_counter()
            rate = (state.step - tb_since[0]) * loop.global_batch / max(now - tb_since[1], 1e-9)
            loop.writer.add_step(state.step, lr=lr, samples_per_s=rate)
            tb_since = (state.step, now)
        if loop.checkpointer is not None and mid_epoch_checkpoint_due(state.step, state.epoch_step, cfg,
                                                                      loop.steps_per_epoch):
            loop.checkpointer.save(state)
        if agreed is not None and agreed.stop:
            return EpochResult(True, state.epoch_step - steps_before, time.perf_counter() - start)
        enter("loading data", in_collective=False, step=state.step)
    return EpochResult(False, state.epoch_step - steps_before, time.perf_counter() - start)


@contextmanager
def _one_value_per_channel_is_a_data_error() -> Iterator[None]:
    """torch's BatchNorm refuses a training batch of one value per channel (one sample through a pooled feature,
    as DeepLab's image pooling at one image per process): say so in one line, with the keys that fix it."""
    try:
        yield
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        shape = str(exc).rpartition("input size ")[2]
        raise DataError(f"data.batch_size: a BatchNorm layer got one value per channel (input {shape}: one sample "
                        "through a pooled feature); use data.batch_size >= 2 per process or syncbn.enabled=true") from None


def _check_agreed(agreed: Agreement, state: TrainState, model: nn.Module) -> None:
    """What the ranks learn at an agreement and must stop on, together: a non-finite loss, a BatchNorm layer that
    normalised a global batch of one value per channel (SyncBN counts it on the device; read here, where the
    agreement has read the host anyway)."""
    if (bad := agreed.first_nonfinite()) is not None:
        bad_step = state.step - len(agreed.loss_sums) + 1 + bad
        raise NonFiniteLossError(
            f"loss is NaN or infinite at step {bad_step} (epoch {state.epoch + 1}); stopping. "
            "Lower train.lr, enable train.clip_grad_norm, or check the data"
        )
    try:
        check_values_per_channel(model)
    except ValueError as exc:
        raise DataError(f"{exc}; by step {state.step} (data.batch_size, data.drop_last)") from None


def _log_losses(loop: TrainLoop, metric_logger: MetricLogger, agreed: Agreement, steps_done: int) -> None:
    """Each agreed step's global loss to the console meter, and every ``train.print_freq``-th to TensorBoard."""
    first = steps_done - len(agreed.counts)  # steps done before the agreed window
    for k, (total, n) in enumerate(zip(agreed.loss_sums, agreed.counts)):
        loss = total / max(n, 1)
        metric_logger.update(loss=loss)
        if loop.writer is not None and (first + k + 1) % loop.cfg.print_freq == 0:
            loop.writer.add_step(first + k + 1, loss=loss)


def _optimizer_step(loop: TrainLoop) -> None:
    if loop.cfg.clip_grad_norm > 0:
        loop.scaler.unscale_(loop.optimizer)  # clip the true gradients, not the loss-scaled ones
        nn.utils.clip_grad_norm_(loop.model.parameters(), loop.cfg.clip_grad_norm)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()


def settle_bn_statistics(model: nn.Module, cfg: SyncBNConfig, precise_loader: DataLoader | None) -> None:
    """Running stats fit to evaluate and save: PreciseBN over ``cfg.precise_bn_samples`` training samples when a
    loader is given (the same samples every time: a resume stays exact), else made consistent across ranks."""
    if precise_loader is None or cfg.precise_bn_samples == 0:
        consistent_bn_buffers(model, cfg)
        return
    start = time.perf_counter()
    enter("recomputing BatchNorm statistics (PreciseBN)", in_collective=True)
    precise_loader.sampler.set_epoch(0)
    used = recompute_bn_stats(model, precise_loader, cfg.precise_bn_samples)
    progress()
    layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    get_logger().info(f"PreciseBN: running stats of {layers} BatchNorm layers from {used} training samples "
                      f"in {time.perf_counter() - start:.1f}s")


def consistent_bn_buffers(model: nn.Module, cfg: SyncBNConfig) -> None:
    """Without SyncBN each rank's running stats drift apart: make them agree before they are used or saved.

    With SyncBN they are identical on every rank already, and this does nothing (no collective).
    """
    if not cfg.enabled:
        sync_bn_buffers(model, policy=cfg.buffer_policy)  # a no-op without a process group


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, device: torch.device, cfg: TrainConfig) -> dict[str, Any]:
    """The task's scores over the whole validation set (classification: loss, top-1, top-5; segmentation: loss,
    mIoU, pixel accuracy, per-class IoU), from sums and counts reduced across ranks.

    ``model`` must be the unwrapped module: ranks may hold different numbers of batches,
    so nothing inside the loop may communicate; the only collective is the scorer's final sum.
    """
    model.eval()
    enter("evaluating", in_collective=False)
    scorer = task.scorer(device)
    for images, targets in loader:
        progress()
        images, targets = _to_device(images, device, cfg.channels_last), targets.to(device, non_blocking=True)
        with _autocast(device, cfg.amp):
            output = model(images)
        scorer.update(output, targets)
    enter("in the evaluation's final sum", in_collective=True)
    metrics = scorer.result()
    progress()
    return metrics
