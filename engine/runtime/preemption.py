"""Signals and exit codes: SIGTERM / SIGUSR1 ask the run to stop; the exit codes a scheduler understands.

The handler only records the signal. The trainer hands the request on at the ranks' next agreement
(:mod:`engine.runtime.agreement`), so every rank stops at the same step, saves, and exits ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; a checkpoint was saved and a relaunch resumes
EXIT_INTERRUPTED = 130  # Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Records SIGTERM / SIGUSR1 while active (a context manager); the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: int = 0  # the last stop signal's number, 0 while none arrived
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received != 0

    def __enter__(self) -> StopSignal:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum


def record_exit_code(code: int) -> None:
    """Leave this worker's exit code in ``$DDP_EXIT_CODE_DIR/<rank>`` when a launch script asks for it: torchrun
    exits 1 whenever a worker exits non-zero, so ``scripts/launch_*.sh`` return the workers' own 75 (checkpoint
    saved, relaunch to resume) or 130 (interrupted) from here, for a scheduler or a requeue loop to act on."""
    folder = os.environ.get("DDP_EXIT_CODE_DIR")
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, os.environ.get("RANK", "0")), "w", encoding="ascii") as f:
            f.write(f"{code}\n")
