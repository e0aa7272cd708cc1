"""The train step and epoch loop, and exact distributed evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from engine.config import TrainConfig
from engine.distributed import all_reduce_sum
from engine.faults import FaultInjector
from engine.logging import MetricLogger
from engine.preemption import StopFlags


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops instead of producing silent garbage."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so a resume continues at the same sample."""

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # optimizer steps done since the start of training
    epoch_step: int = 0  # optimizer steps done within ``epoch``
    best_acc1: float = -1.0
    loss_sum: float = 0.0  # global (all ranks) train-loss sum of ``epoch`` so far
    loss_count: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _autocast(device: torch.device, amp: str):
    dtype = amp_dtype(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _to_device(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last and batch.ndim == 4 else torch.preserve_format
    return batch.to(device, non_blocking=True, memory_format=memory_format)


def mid_epoch_checkpoint_due(steps_done: int, epoch_steps_done: int, cfg: TrainConfig, steps_per_epoch: int) -> bool:
    """Whether a mid-epoch checkpoint follows the step that makes ``steps_done``: the one rule the entry script
    saves by and the agreement schedule reads (the ranks must agree before every save)."""
    every = cfg.checkpoint_every_steps
    return every > 0 and steps_done % every == 0 and epoch_steps_done < steps_per_epoch


def _agree_at_step(state: TrainState, cfg: TrainConfig, steps_per_epoch: int, first_step: bool) -> bool:
    """Whether the ranks agree (stop signal, losses) in step ``state.step``: every ``cfg.agree_every_steps``
    steps, and always at the first step ``train_one_epoch`` runs (the epoch's first, or the first after a
    resume: a broken setup shows at once, and the first log line has a loss), before a checkpoint (a NaN loss
    stops the run before it reaches one) and at the epoch's end (its loss is complete).
    Every rank computes the same answer from the same numbers: no rank is left waiting in the all-reduce.
    """
    done, epoch_done = state.step + 1, state.epoch_step + 1  # once this step is done
    return (
        first_step
        or done % cfg.agree_every_steps == 0
        or epoch_done == steps_per_epoch
        or mid_epoch_checkpoint_due(done, epoch_done, cfg, steps_per_epoch)
    )


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    cfg: TrainConfig,
    steps_per_epoch: int,
    device: torch.device,
    stop_flags: StopFlags,
    faults: FaultInjector,
    log_enabled: bool,
    on_step_end: Callable[[], None],
) -> bool:
    """Run the optimizer steps left in ``state.epoch``; return True when a stop signal asked to end early."""
    model.train()
    accum = cfg.accumulate_steps
    micro_batches = (steps_per_epoch - state.epoch_step) * accum
    header = f"epoch {state.epoch + 1}/{cfg.epochs}"
    metric_logger = MetricLogger(header, cfg.print_freq, log_enabled, cfg.progress_bar)
    step_loss, step_count = torch.zeros((), device=device), 0  # this rank's loss sum and samples in this step
    window_losses: list[torch.Tensor] = []  # ... of each step since the ranks last agreed
    window_counts: list[int] = []
    batches = itertools.islice(loader, micro_batches)
    for i, (images, targets) in enumerate(metric_logger.log_every(batches, micro_batches, loader.batch_size)):
        if i % accum == 0:
            faults.before_step(state.step)
        images, targets = _to_device(images, device, cfg.channels_last), targets.to(device, non_blocking=True)
        last_micro_step = (i + 1) % accum == 0
        # gradients are all-reduced only on the micro-step that ends an accumulation window
        sync_context = nullcontext() if last_micro_step or not isinstance(model, DDP) else model.no_sync()
        with sync_context:
            with _autocast(device, cfg.amp):
                loss = F.cross_entropy(model(images), targets, label_smoothing=cfg.label_smoothing)
            loss = faults.corrupt_loss(loss, state.step)
            step_loss += loss.detach().float() * len(targets)
            step_count += len(targets)
            agreement = None
            if last_micro_step:
                window_losses.append(step_loss)
                window_counts.append(step_count)
                step_loss, step_count = torch.zeros((), device=device), 0
                if _agree_at_step(state, cfg, steps_per_epoch, first_step=i + 1 == accum):
                    # the ranks agree on (stop, each step's global loss) while the backward runs
                    agreement = stop_flags.start_sync(window_losses, window_counts)
                    window_losses, window_counts = [], []
            scaler.scale(loss / accum).backward()
        if not last_micro_step:
            continue

        agreed = agreement() if agreement is not None else None
        if agreed is not None and (bad := agreed.first_nonfinite()) is not None:
            bad_step = state.step - len(agreed.loss_sums) + 1 + bad
            raise NonFiniteLossError(
                f"loss is NaN or infinite at step {bad_step} (epoch {state.epoch + 1}); stopping. "
                "Lower train.lr, enable train.clip_grad_norm, or check the data"
            )
        if cfg.clip_grad_norm > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        state.step += 1
        state.epoch_step += 1
        if agreed is not None:
            state.loss_sum += sum(agreed.loss_sums)
            state.loss_count += sum(agreed.counts)
            for total, n in zip(agreed.loss_sums, agreed.counts):
                metric_logger.update(loss=total / max(n, 1))
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        on_step_end()
        if agreed is not None and agreed.stop:
            return True
    return False


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: str, channels_last: bool
) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole validation set: sums and counts reduced across ranks.

    ``model`` must be the unwrapped module: ranks may hold different numbers of batches,
    so nothing inside the loop may communicate; the only collective is the final sum.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
    for images, targets in loader:
        images, targets = _to_device(images, device, channels_last), targets.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        totals += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(1).sum().double(),
                               totals.new_tensor(len(targets))])
    loss_sum, top1, top5, count = all_reduce_sum(totals).tolist()
    count = max(count, 1)
    return {"val_loss": loss_sum / count, "val_acc1": 100 * top1 / count, "val_acc5": 100 * top5 / count}
