"""Preemption: SIGTERM / SIGUSR1 on any rank makes all ranks stop at the same step.

The handler only records the signal; the training loop calls :meth:`StopFlags.sync`
once per optimizer step, which folds this rank's flags into one tiny all-reduce so
every rank takes the same decision at the same step (no rank waits in a collective
the others have left). The same reduction carries "this rank saw a non-finite loss"
and the step's loss sum and sample count, so every rank knows the global loss.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

from engine.distributed import all_reduce_sum

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

    def sync(self, loss_sum: torch.Tensor, count: int) -> tuple[bool, bool, float, int]:
        """(stop requested on any rank, non-finite loss on any rank, global loss sum, global count).

        One all-reduce and one host read per step; the result is identical on every rank.
        """
        loss_sum = loss_sum.detach().double()
        flags = torch.stack([
            loss_sum.new_tensor(float(self.signal_received != 0)),
            (~torch.isfinite(loss_sum)).double(),
            torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0),
            loss_sum.new_tensor(float(count)),
        ])
        stop, nonfinite, total, n = all_reduce_sum(flags).tolist()
        return stop > 0, nonfinite > 0, total, int(n)
