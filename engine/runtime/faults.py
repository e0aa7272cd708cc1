"""Test-only fault injection (``debug.*`` keys): make one rank fail at a chosen step and point.

The fault-tolerance tests use it to prove that a failing rank brings the whole job down, that NaN losses stop
training, that ``torchrun --max-restarts`` resumes, that a kill around a checkpoint loses no metrics line, and that
a rank hanging in a step ends the job (``dist.step_timeout_s``). Points: ``step`` (before the forward of optimizer
step ``fault_step``), ``before_checkpoint`` / ``after_checkpoint`` (around the save made after ``fault_step`` steps).
"""

from __future__ import annotations

import os
import signal
import threading

import torch

from engine.config import DebugConfig


class InjectedFault(RuntimeError):
    """Raised by ``debug.fault_kind: raise``."""


class FaultInjector:
    """The trainer's optional test hook: called before each optimizer step and on each loss."""

    def __init__(self, cfg: DebugConfig, rank: int, output_dir: str) -> None:
        self.cfg, self.rank = cfg, rank
        self.marker = os.path.join(output_dir, f".fault_injected_rank{rank}")

    @classmethod
    def from_config(cls, cfg: DebugConfig, rank: int, output_dir: str) -> FaultInjector | None:
        """An injector when ``debug.fault_step`` is set, else None (the trainer then skips the hook entirely)."""
        return cls(cfg, rank, output_dir) if cfg.fault_step >= 0 else None

    def _armed(self, step: int, kinds: tuple[str, ...], point: str = "step") -> bool:
        cfg = self.cfg
        if (cfg.fault_step, cfg.fault_rank, cfg.fault_point) != (step, self.rank, point) or cfg.fault_kind not in kinds:
            return False
        if cfg.fault_once:
            if os.path.exists(self.marker):
                return False
            with open(self.marker, "w") as f:
                f.write(f"step {step}\n")
        return True

    def before_step(self, step: int) -> None:
        """Fail before the forward pass of optimizer step ``step`` (raise, exit, SIGKILL, hang, or SIGUSR1)."""
        self.at("step", step)

    def at(self, point: str, step: int) -> None:
        """Fail at ``point`` of step ``step`` when the config asks for it there."""
        if not self._armed(step, ("raise", "exit", "sigkill", "hang", "signal"), point):
            return
        if self.cfg.fault_kind == "raise":
            raise InjectedFault(f"injected fault on rank {self.rank} at step {step} (debug.fault_kind=raise)")
        if self.cfg.fault_kind == "exit":
            os._exit(3)
        if self.cfg.fault_kind == "hang":
            threading.Event().wait()  # forever, outside any collective, as a stuck loader or a deadlock would
        if self.cfg.fault_kind == "signal":  # a stop request (SIGUSR1) reaching this rank alone, at this point
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        os.kill(os.getpid(), signal.SIGKILL)

    def corrupt_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``debug.fault_kind: nan``: this rank's loss becomes NaN at ``step``."""
        return loss * float("nan") if self._armed(step, ("nan",)) else loss
