"""Preemption: SIGTERM / SIGUSR1 on any rank makes all ranks stop at the same step.

The handler only records the signal; every few optimizer steps (``train.agree_every_steps``, and always
before a checkpoint) the training loop calls :meth:`StopFlags.start_sync`, which folds this rank's flag into
one tiny all-reduce so every rank takes the same decision at the same step (no rank waits in a collective
the others have left). The same reduction carries each step's loss sum and sample count since the last
agreement, so every rank knows the global loss of every step, and at which step any rank's loss became NaN
or infinite.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import torch

from engine.distributed import start_all_reduce_sum

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; a checkpoint was saved and a relaunch resumes
EXIT_INTERRUPTED = 130  # Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlags:
    """The signal-driven stop request, agreed across ranks together with the losses since the last agreement."""

    def __init__(self) -> None:
        self.signal_received: int = 0
        self.previous = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_received = signum

    def start_sync(self, loss_sums: list[torch.Tensor], counts: list[int]) -> Callable[[], Agreement]:
        """Start agreeing on the steps since the last agreement: this rank's loss sum and sample count of each.

        The trainer starts it once the last of those steps' forward is done and reads it after the backward, so
        the all-reduce overlaps the backward; the read is this rank's only host sync between agreements.
        """
        losses = torch.stack(loss_sums).double()
        flags = torch.cat([losses.new_tensor([float(self.signal_received != 0), *counts]), losses])
        wait = start_all_reduce_sum(flags)

        def result() -> Agreement:
            stop, *values = wait().tolist()
            n = len(counts)
            return Agreement(stop > 0, values[n:], [int(c) for c in values[:n]])

        return result


@dataclass(frozen=True)
class Agreement:
    """What every rank knows after an agreement, identical on every rank."""

    stop: bool  # a stop signal reached some rank
    loss_sums: list[float]  # global loss sum of each step since the previous agreement, oldest first
    counts: list[int]  # global sample count of each of those steps

    def first_nonfinite(self) -> int | None:
        """Index of the first step whose loss was NaN or infinite on some rank (a NaN on any rank makes the sum NaN)."""
        return next((i for i, total in enumerate(self.loss_sums) if not math.isfinite(total)), None)
