"""Everything around a training step that is not the step: the cross-cutting work, behind three calls, and the run's
save; :func:`step_events` sets it all up for the entry script.

- :meth:`StepEvents.batches` yields the micro-batches left in the epoch, draws the console meter and tells the
  watchdog when a rank waits for data and when it computes;
- :meth:`StepEvents.loss` sees each micro-batch's loss: test-only fault injection, the loss window, and the start
  of the ranks' agreement (it overlaps the backward);
- :meth:`StepEvents.step_done` follows each optimizer step: the agreement's verdict (stop, NaN, one value per
  channel), the EMA update, the logs, a mid-epoch checkpoint; it says whether the ranks agreed to stop.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from engine.bn import RunningStatistics, check_values_per_channel
from engine.checkpoint import Checkpointer
from engine.config import TrainConfig
from engine.ema import ModelEma
from engine.errors import DataError, NonFiniteLossError
from engine.logging import MetricLogger, MetricsWriter, get_logger
from engine.runtime.agreement import Agreement, LossWindow, StopPoll, agree_after_step, mid_epoch_checkpoint_due
from engine.runtime.faults import FaultInjector
from engine.runtime.preemption import STOP, StopSignal
from engine.runtime.watchdog import enter, progress, watch_steps
from engine.train_state import TrainState


@dataclass
class StepEvents:
    """The work around every step, built once by the entry script."""

    cfg: TrainConfig
    model: nn.Module  # the trained module (its SyncBN layers count single-value batches)
    optimizer: torch.optim.Optimizer  # for the learning rate in the logs
    steps_per_epoch: int
    global_batch: int  # samples per optimizer step over all processes
    stop: StopSignal
    save: Callable[..., None]  # (state, is_best=False): a checkpoint (mid-epoch: train.checkpoint_every_steps)
    writer: MetricsWriter | None = None  # per-step values to the trackers every train.print_freq steps (rank 0)
    ema: ModelEma | None = None  # updated after every train.ema_every optimizer steps
    faults: FaultInjector | None = None  # test-only fault injection (debug.*)
    log_enabled: bool = True  # rank 0 prints the step lines
    poll: StopPoll | None = None  # every step between agreements: did any rank get a stop signal (None: agreements only)
    model_name: str = "this model"  # model.name, for the divergence warning
    _window: LossWindow | None = field(default=None, init=False)
    _pending: Callable[[], Agreement] | None = field(default=None, init=False)
    _polled: Callable[[], bool] | None = field(default=None, init=False)
    _meter: MetricLogger | None = field(default=None, init=False)
    _since: tuple[int, float] = field(default=(0, 0.0), init=False)  # step and time of the last TensorBoard rate
    _first_step: int = field(default=0, init=False)  # the first step of this call of the epoch (always agreed on)
    _first_loss: float = field(default=0.0, init=False)  # a fresh run's step-1 loss, for the divergence warning

    def batches(self, loader: DataLoader, state: TrainState) -> Iterator[Any]:
        """The micro-batches left in ``state.epoch`` (the sampler was set to its epoch and step), with the console
        meter, watched by the watchdog."""
        accum = self.cfg.accumulate_steps
        left = (self.steps_per_epoch - state.epoch_step) * accum
        self._meter = MetricLogger(f"epoch {state.epoch + 1}/{self.cfg.epochs}", self.cfg.print_freq,
                                   self.log_enabled, self.cfg.progress_bar)  # fmt: skip
        self._window, self._since = LossWindow(next(self.model.parameters()).device), (state.step, time.perf_counter())
        self._first_step = state.step
        enter("loading data", in_collective=False, step=state.step)
        for i, batch in enumerate(self._meter.log_every(itertools.islice(loader, left), left, loader.batch_size)):
            enter("in the step, outside collectives", in_collective=False)
            if self.faults is not None and i % accum == 0:
                self.faults.before_step(state.step)
            enter("in forward/backward (SyncBN, gradient all-reduce) or the ranks' agreement", in_collective=True)
            yield batch
            enter("loading data", in_collective=False, step=state.step)

    def loss(self, loss: torch.Tensor, samples: int, ends_step: bool, state: TrainState) -> torch.Tensor:
        """A micro-batch's mean loss over ``samples``; when it ends a step on which the ranks agree, the agreement
        starts now, so its all-reduce overlaps the backward."""
        if self.faults is not None:
            loss = self.faults.corrupt_loss(loss, state.step)
        self._window.add(loss, samples)
        if ends_step:
            self._window.end_step()
            # also at the first step an epoch's call runs: a broken setup shows at once, the first line has a loss
            due = agree_after_step(state.step + 1, state.epoch_step + 1, self.cfg, self.steps_per_epoch)
            if due or state.step == self._first_step:
                self._pending = self._window.start_agreement(self.stop.requested)
            elif self.poll is not None:
                self._polled = self.poll.start(self.stop.requested)
        return loss

    def stopped_before_training(self) -> bool:
        """Whether any rank was asked to stop before the first step (during set-up): every rank calls it once."""
        return self.poll.start(self.stop.requested)() if self.poll is not None else self.stop.requested

    def step_done(self, state: TrainState) -> bool:
        """The optimizer step is done: act on the agreement, update the EMA, log, checkpoint mid-epoch; whether the
        ranks agreed to stop (then the caller saves and exits)."""
        agreed, self._pending = (self._pending() if self._pending is not None else None), None
        if self._polled is not None and self._polled():  # a stop between agreements: agree on the window now
            agreed = self._window.start_agreement(True)()
        self._polled = None
        enter("after the optimizer step", in_collective=False)
        if agreed is not None:
            self._check(agreed, state)
            state.finish_step(agreed.loss_sums, agreed.counts)
            self._log_losses(agreed, state.step)
        else:
            state.finish_step()
        if self.ema is not None:
            self.ema.update(state.step)
        progress()
        self._log_step(state.step)
        if mid_epoch_checkpoint_due(state.step, state.epoch_step, self.cfg, self.steps_per_epoch):
            self.save(state)
        return agreed is not None and agreed.stop

    def _check(self, agreed: Agreement, state: TrainState) -> None:
        """What the ranks learn at an agreement and must stop on, together: a non-finite loss, a BatchNorm layer that
        normalised a global batch of one value per channel (SyncBN counts it on the device; read here, where the
        agreement has read the host anyway)."""
        if (bad := agreed.first_nonfinite()) is not None:
            bad_step = state.step - len(agreed.loss_sums) + 1 + bad
            raise NonFiniteLossError(
                f"loss is NaN or infinite at step {bad_step} (epoch {state.epoch + 1}); stopping. "
                "Lower train.lr, enable train.clip_grad_norm, or check the data"
            )
        try:
            check_values_per_channel(self.model)
        except ValueError as exc:
            raise DataError(f"{exc}; by step {state.step + 1} (data.batch_size, data.drop_last)") from None

    def _log_losses(self, agreed: Agreement, steps_done: int) -> None:
        """Each agreed step's global loss to the console meter, and every ``train.print_freq``-th to TensorBoard."""
        first = steps_done - len(agreed.counts)  # steps done before the agreed window
        for k, (total, n) in enumerate(zip(agreed.loss_sums, agreed.counts)):
            loss = total / max(n, 1)
            self._meter.update(loss=loss)
            self._watch_divergence(loss, first + k + 1)
            if self.writer is not None and (first + k + 1) % self.cfg.print_freq == 0:
                self.writer.add_step(first + k + 1, loss=loss)

    def _watch_divergence(self, loss: float, step: int) -> None:
        """A fresh run whose training loss climbs to twice (and 1 above) its first step's within the first epoch is
        named once, with the rate, instead of ending as a quiet chance-level accuracy (a recipe's rate this model
        cannot take). (The validation loss of a healthy first epoch can be far higher, BatchNorm's statistics still
        settling: it is not watched.)"""
        if step == 1:
            self._first_loss = loss
        elif self._first_loss > 0 and step <= self.steps_per_epoch and loss > max(2 * self._first_loss,
                                                                                 self._first_loss + 1):
            lr = self.optimizer.param_groups[0]["lr"]
            get_logger().warning(f"warning: loss {loss:.3g} at step {step} is {loss / self._first_loss:.1f}x its first "
                                 f"value {self._first_loss:.3g}: training is diverging at lr {lr:.3g} with {self.model_name}; "
                                 "lower train.lr (this model may take less than the recipe's), or add "
                                 "train.warmup_epochs or train.clip_grad_norm")  # fmt: skip
            self._first_loss = -1.0  # once

    def _log_step(self, step: int) -> None:
        """The learning rate to the console meter; every ``train.print_freq`` steps, lr and throughput to TensorBoard."""
        lr = self.optimizer.param_groups[0]["lr"]
        self._meter.update(lr=lr)
        if self.writer is not None and step % self.cfg.print_freq == 0:
            now = time.perf_counter()
            rate = (step - self._since[0]) * self.global_batch / max(now - self._since[1], 1e-9)
            self.writer.add_step(step, lr=lr, samples_per_s=rate)
            self._since = (step, now)


@dataclass(frozen=True)
class SaveRun:
    """The run's save: BatchNorm statistics settled for saving (once per step), every rank's state gathered, rank 0
    writing atomically; the watchdog told where each part happens, and the test-only fault points around it."""

    checkpointer: Checkpointer
    bn_stats: RunningStatistics
    faults: FaultInjector | None = None

    def __call__(self, state: TrainState, is_best: bool = False) -> None:
        if self.faults is not None:
            self.faults.at("before_checkpoint", state.step)
        enter("in a checkpoint's collectives", in_collective=True)
        self.bn_stats.before_checkpoint(state.step)
        checkpoint = self.checkpointer.gather(state)
        enter("writing a checkpoint", in_collective=False)
        self.checkpointer.write(checkpoint, is_best)
        progress()
        if self.faults is not None:
            self.faults.at("after_checkpoint", state.step)


@contextmanager
def step_events(checkpointer: Checkpointer, bn_stats: RunningStatistics, state: TrainState,
                steps_per_epoch: int) -> Iterator[StepEvents]:  # fmt: skip
    """What runs around the steps of the run ``checkpointer`` saves, for as long as the loop runs: stop signals
    (SIGTERM, SIGUSR1: checkpoint and exit; polled every step), the watchdog (a rank stuck outside collectives ends
    the job, naming itself), ``metrics.jsonl`` and the trackers on rank 0 (continuing ``state``'s tracker runs),
    the ranks' agreement, EMA updates, mid-epoch checkpoints with settled BatchNorm statistics, and the test suite's faults
    (``debug.*``, docs/testing.md)."""
    cfg, ctx = checkpointer.cfg, checkpointer.ctx
    faults = FaultInjector.from_config(cfg.debug, ctx.rank, cfg.output_dir)  # None unless a test asks for one
    save = SaveRun(checkpointer, bn_stats, faults)
    poll = StopPoll(cfg.dist.timeout_s)
    try:
        with MetricsWriter(cfg, ctx.is_main, state) as writer, watch_steps(cfg.dist.step_timeout_s):
            yield StepEvents(cfg.train, checkpointer.model, checkpointer.optimizer, steps_per_epoch,
                             checkpointer.global_batch, STOP, save, writer=writer, ema=checkpointer.ema,
                             faults=faults, log_enabled=ctx.is_main, poll=poll, model_name=cfg.model.name)  # fmt: skip
    finally:
        poll.close()
