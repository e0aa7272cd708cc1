"""The ranks' periodic agreement: one tiny all-reduce that tells every rank the same facts at the same step.

Every ``train.agree_every_steps`` optimizer steps (and always at an epoch's first and last step and before every
checkpoint) the trainer starts one all-reduce carrying this rank's stop request and the loss sum and sample count
of each step since the last agreement. Afterwards every rank knows, identically: whether any rank was asked to
stop, the global loss of each of those steps, and whether (and at which step) any rank's loss became NaN or
infinite. Decisions taken from it (stop, raise, log) are therefore taken by all ranks at the same step, and no
rank is left waiting in a collective the others have left. Between agreements there is no host read.

Between agreements a :class:`StopPoll` asks only "was any rank asked to stop?" every step, on a CPU (gloo) group
of its own, so a stop signal is acted on at the next step (a scheduler's ``KillWait`` is 30 s by default) without a
device sync.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.comm import is_initialized, start_all_reduce_sum
from engine.config import TrainConfig


@dataclass(frozen=True)
class Agreement:
    """What every rank knows after an agreement, identical on every rank."""

    stop: bool  # a stop signal reached some rank
    loss_sums: list[float]  # global loss sum of each step since the previous agreement, oldest first
    counts: list[int]  # global sample count of each of those steps

    def first_nonfinite(self) -> int | None:
        """Index of the first step whose loss was NaN or infinite on some rank (a NaN on any rank makes the sum NaN)."""
        return next((i for i, total in enumerate(self.loss_sums) if not math.isfinite(total)), None)


def start_agreement(stop: bool, loss_sums: list[torch.Tensor], counts: list[int]) -> Callable[[], Agreement]:
    """Start agreeing on ``stop`` and on this rank's loss sum and sample count of each step since the last agreement.

    The trainer starts it once the last of those steps' forward is done and reads it after the backward, so the
    all-reduce overlaps the backward; the read is this rank's only host sync between agreements.
    """
    losses = torch.stack(loss_sums).double()
    flags = torch.cat([losses.new_tensor([float(stop), *counts]), losses])
    wait = start_all_reduce_sum(flags)

    def result() -> Agreement:
        stopped, *values = wait().tolist()
        n = len(counts)
        return Agreement(stopped > 0, values[n:], [int(c) for c in values[:n]])

    return result


class StopPoll:
    """Every step's "was any rank asked to stop?": one number all-reduced on a gloo group of its own (a CPU tensor:
    no device sync, and nothing queued behind the step's gradient all-reduces), started when a step's last forward
    is done and read after its optimizer step. Every rank reads the same answer at the same step. Build it on every
    rank (it creates a process group); ``close`` it when the loop ends."""

    def __init__(self, timeout_s: float) -> None:
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) if is_initialized() else None

    def start(self, stop: bool) -> Callable[[], bool]:
        wait = start_all_reduce_sum(torch.tensor([float(stop)]), self.group) if self.group is not None else None
        return (lambda: wait().item() > 0) if wait is not None else (lambda: stop)

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


class LossWindow:
    """This rank's loss sum and sample count of each step since the ranks last agreed (device tensors, no sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sums: list[torch.Tensor] = []
        self.counts: list[int] = []
        self._step_sum, self._step_count = torch.zeros((), device=device), 0

    def add(self, mean_loss: torch.Tensor, samples: int) -> None:
        """One micro-batch of the step in progress."""
        self._step_sum += mean_loss.detach().float() * samples
        self._step_count += samples

    def end_step(self) -> None:
        self.loss_sums.append(self._step_sum)
        self.counts.append(self._step_count)
        self._step_sum, self._step_count = torch.zeros((), device=self.device), 0

    def start_agreement(self, stop: bool) -> Callable[[], Agreement]:
        """:func:`start_agreement` over the window's steps; the window starts afresh."""
        pending = start_agreement(stop, self.loss_sums, self.counts)
        self.loss_sums, self.counts = [], []
        return pending


def mid_epoch_checkpoint_due(steps_done: int, epoch_steps_done: int, cfg: TrainConfig, steps_per_epoch: int) -> bool:
    """Whether a mid-epoch checkpoint follows the step that makes ``steps_done``: the one rule the trainer saves
    by and the agreement schedule reads (the ranks must agree before every save)."""
    every = cfg.checkpoint_every_steps
    return every > 0 and steps_done % every == 0 and epoch_steps_done < steps_per_epoch


def agree_after_step(steps_done: int, epoch_steps_done: int, cfg: TrainConfig, steps_per_epoch: int) -> bool:
    """Whether the ranks agree in the step that makes ``steps_done``: every ``cfg.agree_every_steps`` steps, before
    a checkpoint (a NaN loss stops the run before it reaches one) and at the epoch's end (its loss is complete).
    The trainer also agrees at the first step it runs (a broken setup shows at once; the first log line has a loss).
    Every rank computes the same answer from the same numbers: no rank is left waiting in the all-reduce.
    """
    return (
        steps_done % cfg.agree_every_steps == 0
        or epoch_steps_done == steps_per_epoch
        or mid_epoch_checkpoint_due(steps_done, epoch_steps_done, cfg, steps_per_epoch)
    )
