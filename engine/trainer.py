"""The training step and the epoch: forward, loss, backward, optimizer step, read as the recipe.

Everything around a step that is not the step itself (where the watchdog thinks we are, fault injection, the
ranks' agreement, logging, the EMA, mid-epoch checkpoints) reaches it through :class:`engine.step_events.StepEvents`.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from engine.config import TrainConfig
from engine.inputs import InputPrep
from engine.step_events import StepEvents
from engine.train_state import TrainState

if TYPE_CHECKING:
    from tasks.registry import Task  # the interface only: engine/ imports no task

# fp16's GradScaler skips the optimizer step when the gradients overflow (by design, often in the first steps); the
# schedule still advances once per step, so the learning rate stays a function of the step (and of a resume)
warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`", UserWarning)


@dataclass
class TrainLoop:
    """What a training step needs, built once by the entry script and handed to every epoch."""

    model: nn.Module  # as trained: wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    task: Task  # the loss of a batch
    inputs: InputPrep  # a batch on the device, as the model takes it


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, amp: str):
    """``train.amp``'s autocast for the forward pass (training and evaluation alike)."""
    dtype = amp_dtype(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def train_one_epoch(loop: TrainLoop, loader: DataLoader, state: TrainState, events: StepEvents) -> bool:
    """Run the optimizer steps left in ``state.epoch`` (from ``state.epoch_step`` on, so a resume continues at
    the same sample); whether it ended early because the ranks agreed that a stop signal arrived (a checkpoint is
    then due before exiting). The training time is added to ``state``."""
    model, cfg, accum = loop.model, loop.cfg, loop.cfg.accumulate_steps
    start, stopped = time.perf_counter(), False
    model.train()
    for i, (images, targets) in enumerate(events.batches(loader, state)):
        images, targets = loop.inputs(images), loop.inputs.targets(targets)
        ends_step = (i + 1) % accum == 0
        # DDP all-reduces gradients in the backward of the micro-batch that ends an accumulation window only
        with nullcontext() if ends_step or not isinstance(model, DDP) else model.no_sync():
            with autocast(loop.inputs.device, cfg.amp):
                loss = loop.task.training_loss(model, images, targets)
            loss = events.loss(loss, len(targets), ends_step, state)
            loop.scaler.scale(loss / accum).backward()
        if ends_step:
            _optimizer_step(loop)
            stopped = events.step_done(state)
            if stopped:
                break
    state.add_train_time(time.perf_counter() - start)
    return stopped


def _optimizer_step(loop: TrainLoop) -> None:
    if loop.cfg.clip_grad_norm > 0:
        loop.scaler.unscale_(loop.optimizer)  # clip the true gradients, not the loss-scaled ones
        nn.utils.clip_grad_norm_(loop.model.parameters(), loop.cfg.clip_grad_norm)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
