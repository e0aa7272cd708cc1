"""When running statistics are settled: the one place that decides it, for the model, its EMA and the scripts.

Running statistics are *used* at evaluation and *kept* in checkpoints. Before either they must be right on every
rank: recomputed by PreciseBN (before an evaluation, when asked for), or made to agree across ranks (trained
without SyncBN, each rank's drift apart; with SyncBN they are identical already and nothing runs). Each module is
settled at most once per optimizer step: an evaluation followed by a save at the same step settles once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.bn.buffers import sync_bn_buffers
from engine.bn.convert import batchnorm_layers
from engine.bn.precise import Forward, recompute_bn_stats


@dataclass(frozen=True)
class SettlePolicy:
    """How a run's BatchNorm statistics become fit to evaluate and save."""

    synchronised: bool  # trained with SyncBN over the whole world: identical on every rank already
    buffer_policy: str = "broadcast"  # otherwise how the ranks agree: rank 0's (broadcast) or pooled (reduce)
    amp_dtype: torch.dtype | None = None  # PreciseBN's passes run under the autocast training and evaluation use


@dataclass
class _Tracked:
    module: nn.Module
    precise_samples: int  # > 0: PreciseBN over this many samples before each evaluation
    settled_at: int | None = None  # the optimizer step at which it was last settled
    precise_at: int | None = None  # ... by PreciseBN


class RunningStatistics:
    """Settles the running statistics of the modules it tracks, before evaluations and before checkpoints.

    ``precise_batches``: an iterable that yields the same training batches each time it is iterated (a resumed
    run must recompute what the uninterrupted one did); ``forward``: how PreciseBN runs a module on one of them
    (None: on its input alone). ``report``: where a line on each PreciseBN goes.
    """

    def __init__(self, policy: SettlePolicy, precise_batches: Iterable[Any] | None = None,
                 report: Callable[[str], None] | None = None, forward: Forward | None = None) -> None:  # fmt: skip
        self.policy, self.precise_batches, self.report, self.forward = policy, precise_batches, report, forward
        self.tracked: list[_Tracked] = []

    def track(self, module: nn.Module, precise_samples: int = 0) -> None:
        """Settle ``module`` too: by PreciseBN over ``precise_samples`` samples before evaluations (0: never)."""
        if precise_samples and self.precise_batches is None:
            raise ValueError("RunningStatistics: PreciseBN needs precise_batches")
        self.tracked.append(_Tracked(module, precise_samples))

    def before_evaluation(self, step: int) -> None:
        """Every tracked module fit to evaluate at optimizer step ``step`` (a collective: every rank calls it)."""
        for item in self.tracked:
            if item.precise_samples:
                if item.precise_at != step:
                    self._precise(item.module, item.precise_samples)
                    item.precise_at = step
            elif item.settled_at != step:
                self._agree(item.module)
            item.settled_at = step

    def before_checkpoint(self, step: int) -> None:
        """Every tracked module fit to save at optimizer step ``step`` (a collective: every rank calls it)."""
        for item in self.tracked:
            if item.settled_at != step:
                self._agree(item.module)
                item.settled_at = step

    def _agree(self, module: nn.Module) -> None:
        if not self.policy.synchronised:
            sync_bn_buffers(module, policy=self.policy.buffer_policy)  # a no-op without a process group

    def _precise(self, module: nn.Module, samples: int) -> None:
        layers = [layer for _, layer in batchnorm_layers(module)]
        if not layers:
            return
        start, dtype = time.perf_counter(), self.policy.amp_dtype
        device_type = layers[0].running_mean.device.type
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            used = recompute_bn_stats(module, self.precise_batches, samples, self.forward)
        if self.report is not None:
            self.report(f"PreciseBN: running stats of {len(layers)} BatchNorm layers from {used} training samples "
                        f"in {time.perf_counter() - start:.1f}s")
