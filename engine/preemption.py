"""Preemption: SIGTERM / SIGUSR1 on any rank makes all ranks stop at the same step.

The handler only records the signal; the training loop calls :meth:`StopFlags.start_sync`
once per optimizer step, which folds this rank's flags into one tiny all-reduce so
every rank takes the same decision at the same step (no rank waits in a collective
the others have left). The same reduction carries the step's loss sum and sample count,
so every rank knows the global loss, and whether any rank's loss was NaN or infinite.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from types import FrameType

import torch

from engine.distributed import start_all_reduce_sum

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; a checkpoint was saved and a relaunch resumes
EXIT_INTERRUPTED = 130  # Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlags:
    """Signal-driven stop request plus per-step anomaly flags, agreed across ranks."""

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

    def start_sync(self, loss_sum: torch.Tensor, count: int) -> Callable[[], tuple[bool, bool, float, int]]:
        """Start agreeing on this step; the returned function gives (stop requested on any rank, non-finite loss
        on any rank, global loss sum, global count), identical on every rank.

        Everything it reduces is known once the step's forward is done, so the trainer starts it there and reads
        it after the backward: one small all-reduce that overlaps the backward, and one host read per step, which
        is what lets a non-finite loss stop every rank before its optimizer step. No separate flag is needed for
        that: a NaN or infinite loss on any rank makes the global sum NaN or infinite.
        """
        flags = loss_sum.new_tensor([float(self.signal_received != 0), 0.0, float(count)], dtype=torch.float64)
        flags[1] = loss_sum.detach()
        wait = start_all_reduce_sum(flags)

        def result() -> tuple[bool, bool, float, int]:
            stop, total, n = wait().tolist()
            return stop > 0, not math.isfinite(total), total, int(n)

        return result
