"""The step watchdog: a rank that stops making progress ends the whole job, naming itself and the step.

A rank stuck outside the collectives (a hung data-loader worker, a deadlock in user code, a hung disk) leaves its
peers waiting in their next collective; without this only the process-group timeout ends such a job, if it ever
does. While the training loop runs, one daemon thread per process wakes every second and compares the time since
the last progress (an optimizer step, an evaluation batch, a checkpoint written) with ``dist.step_timeout_s``:

- a rank that is *not* inside a collective when the time runs out is the stuck one: it prints one line naming its
  rank, the step and what it was doing, and exits 1; the launcher (torchrun, srun) then ends the other ranks;
- a rank waiting *inside* a collective waits for such a rank: it gives it a grace period to speak and exit first,
  then exits 1 itself, saying that it waited for a peer (one that died silently, or is stuck holding the GIL).

The trainer reports where it is with :func:`enter` and progress with :func:`progress`: attribute writes, free in
the hot loop, and no-ops when no watchdog runs. Why not ``torch.distributed.elastic.timer``: its server lives in
torchrun's agent only (not under srun or a plain ``python`` run), and it kills without saying which step or where.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

from engine.logging import print_error
from engine.runtime.distributed import dump_collective_trace, launch_rank

GRACE_S = 30.0  # at most this long, a rank waiting in a collective lets the stuck peer report first


class StepWatchdog:
    """The thread and what it watches; use it through :func:`watch_steps`, :func:`enter` and :func:`progress`."""

    def __init__(self, timeout_s: float, poll_s: float = 1.0) -> None:
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.step, self.where, self.in_collective = 0, "starting the training loop", False
        self.last_progress = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)

    def start(self) -> None:
        self.last_progress = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the thread: no daemon thread is left to wake during interpreter teardown."""
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            idle = time.monotonic() - self.last_progress
            if idle < self.timeout_s or (self.in_collective and idle < self.timeout_s + min(self.timeout_s, GRACE_S)):
                continue
            rank = launch_rank()
            if self.in_collective:
                what = f"rank {rank} waited in a collective ({self.where}) for a peer that stopped"
            else:
                what = f"rank {rank} is stuck {self.where}"
            traces = dump_collective_trace()
            where = f" (its collectives: {traces})" if traces else ""
            print_error(f"no training step finished for {idle:.0f} s (dist.step_timeout_s={self.timeout_s:g}): "
                        f"{what} at step {self.step}; ending the job{where}")
            os._exit(1)


_active: StepWatchdog | None = None


@contextlib.contextmanager
def watch_steps(timeout_s: float) -> Iterator[None]:
    """Run the watchdog while the block runs (``timeout_s`` 0: no watchdog)."""
    global _active
    if timeout_s > 0:
        _active = StepWatchdog(timeout_s)
        _active.start()
    try:
        yield
    finally:
        if _active is not None:
            _active.stop()
            _active = None


def enter(where: str, in_collective: bool, step: int | None = None) -> None:
    """This rank is now ``where`` (of optimizer step ``step``, when given; the index the step messages use)."""
    if _active is not None:
        _active.where, _active.in_collective = where, in_collective
        if step is not None:
            _active.step = step


def progress() -> None:
    """Something finished (an optimizer step, an evaluation batch, a checkpoint): the clock starts again."""
    if _active is not None:
        _active.last_progress = time.monotonic()
