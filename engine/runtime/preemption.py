"""Signals and exit codes: SIGTERM / SIGUSR1 ask the run to stop; the exit codes a scheduler understands.

The handler only records the signal. The trainer hands the request on at the ranks' next agreement
(:mod:`engine.runtime.agreement`), so every rank stops at the same step, saves, and exits ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

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
