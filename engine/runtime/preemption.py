"""Signals and exit codes: SIGTERM / SIGUSR1 ask the run to stop; the exit codes a scheduler understands.

The handler only records the signal, and it is installed for the process's whole life, first thing (the entry
script installs it before importing torch): a signal during set-up, during the loop or during teardown never kills
a rank. The trainer hands the request on at the ranks' next step (:mod:`engine.runtime.agreement`), so every rank
stops at the same step, saves, and exits ``EXIT_PREEMPTED``; one that arrived before the first step stops the run
there, with nothing new to save.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; a checkpoint was saved and a relaunch resumes
EXIT_INTERRUPTED = 130  # Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Records SIGTERM / SIGUSR1 from :meth:`install` on (SLURM's ``--signal`` warning, ``scancel``, a preemption,
    ``kill``); the process goes on, and the trainer checkpoints and exits."""

    def __init__(self) -> None:
        self.received: int = 0  # the last stop signal's number, 0 while none arrived

    @property
    def requested(self) -> bool:
        return self.received != 0

    def install(self) -> StopSignal:
        """From now on, for the rest of the process, these signals are recorded instead of ending it."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum


STOP = StopSignal()  # the process's: installed by the entry script before anything else


def record_exit_code(code: int) -> None:
    """Leave this worker's exit code in ``$DDP_EXIT_CODE_DIR/<rank>`` when a launch script asks for it: torchrun
    exits 1 whenever a worker exits non-zero, so ``scripts/launch_*.sh`` return the workers' own 75 (checkpoint
    saved, relaunch to resume) or 130 (interrupted) from here, and ``scripts/slurm.sbatch`` decides to requeue from
    them, for a scheduler or a requeue loop to act on."""
    folder = os.environ.get("DDP_EXIT_CODE_DIR")
    if folder and os.path.isdir(folder):
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID", "0")  # torchrun's, or srun's
        with open(os.path.join(folder, rank), "w", encoding="ascii") as f:
            f.write(f"{code}\n")
