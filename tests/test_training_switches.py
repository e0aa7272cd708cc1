"""The training switches do what they say, seen in the weights the trainer's own step produces (``train_one_epoch``
with its loader, GradScaler and optimizer step): gradient accumulation, gradient clipping, bf16 autocast, fp16 with
the GradScaler. Each is compared with a reference computed here, independently of the trainer."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

from data.loaders import GlobalStepSampler, build_train_loader
from engine.config import DataConfig, TrainConfig
from engine.inputs import InputPrep
from engine.runtime.preemption import StopSignal
from engine.runtime.spawn import spawn
from engine.step_events import StepEvents
from engine.train_state import TrainState
from engine.trainer import TrainLoop, train_one_epoch
from tasks import ClassificationTask

FEATURES, CLASSES = 6, 3


def _data(n: int, dtype: torch.dtype = torch.float64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, FEATURES, generator=gen, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=gen))


def _linear(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES).to(dtype)


def _train(model: nn.Module, cfg: TrainConfig, dataset: TensorDataset, batch: int, rank: int = 0, world: int = 1,
           lr: float = 0.5) -> tuple[nn.Module, torch.amp.GradScaler]:  # fmt: skip
    """One epoch of the trainer's own loop (plain SGD: an update is -lr x the gradient it applied)."""
    sampler = GlobalStepSampler(dataset, world, rank, batch_size=batch)
    loader = build_train_loader(dataset, DataConfig(batch_size=batch, num_workers=0), sampler, 0, False)
    trained = DDP(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.amp == "fp16")
    steps = len(loader) // cfg.accumulate_steps
    loop = TrainLoop(trained, optimizer, scheduler, scaler, cfg, ClassificationTask(), InputPrep(torch.device("cpu")))
    events = StepEvents(cfg, model, optimizer, steps, batch * world * cfg.accumulate_steps, StopSignal(),
                        save=lambda state: None, log_enabled=False)  # fmt: skip
    train_one_epoch(loop, loader, TrainState(), events)
    return model, scaler


QUIET = TrainConfig(progress_bar=False, print_freq=10**6)


def _accumulated_and_whole(rank: int, world: int) -> list[float]:
    """Each rank: 2 micro-batches of 2 per step (accumulated, DDP's no_sync on the first) and 1 batch of 4."""
    data = _data(32)
    accumulated, _ = _train(_linear(), dataclasses.replace(QUIET, accumulate_steps=2), data, batch=2, rank=rank,
                            world=world)  # fmt: skip
    whole, _ = _train(_linear(), QUIET, data, batch=4, rank=rank, world=world)
    return [(a - b).abs().max().item() for a, b in zip(accumulated.parameters(), whole.parameters(), strict=True)]


def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch() -> None:
    """k micro-steps of b == one step of k x b (same samples per step), on 2 ranks of DDP, after 4 optimizer steps."""
    for differences in spawn(_accumulated_and_whole, 2):
        assert max(differences) < 1e-12, differences


def test_clipping_bounds_the_applied_gradient_and_changes_the_step_only_above_the_limit() -> None:
    data, lr, limit = _data(8), 0.5, 0.05
    start = _linear()
    plain, _ = _train(copy.deepcopy(start), dataclasses.replace(QUIET), data, batch=8, lr=lr)
    clipped, _ = _train(copy.deepcopy(start), dataclasses.replace(QUIET, clip_grad_norm=limit), data, batch=8, lr=lr)
    loose, _ = _train(copy.deepcopy(start), dataclasses.replace(QUIET, clip_grad_norm=1e6), data, batch=8, lr=lr)

    def applied(model: nn.Module) -> torch.Tensor:  # the gradient the one SGD step applied
        return torch.cat([(p0 - p).reshape(-1) for p0, p in zip(start.parameters(), model.parameters())]) / lr

    raw = applied(plain)
    assert raw.norm() > 10 * limit  # the unclipped gradient is above the limit, so clipping must act
    assert torch.allclose(applied(clipped).norm(), torch.tensor(limit, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(applied(clipped), raw * limit / raw.norm(), atol=1e-9)  # same direction, shorter
    assert torch.equal(applied(loose), raw)  # below the limit: the step is unchanged


def test_bf16_runs_the_forward_in_bf16() -> None:
    seen: list[torch.dtype] = []
    model = _linear(torch.float32)
    model.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    _train(model, dataclasses.replace(QUIET, amp="bf16"), _data(8, torch.float32), batch=4)
    _train(model, QUIET, _data(8, torch.float32), batch=4)
    assert seen == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_fp16_with_the_grad_scaler_skips_a_step_with_an_inf_gradient() -> None:
    """The first backward's gradient holds an inf: that step is skipped (weights unchanged) and the scale halves;
    the next step applies normally."""
    model = _linear(torch.float32)
    start = copy.deepcopy(model)
    steps_seen = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        steps_seen.append(len(steps_seen))
        return grad * float("inf") if len(steps_seen) == 1 else grad

    model.weight.register_hook(poison)
    cfg = dataclasses.replace(QUIET, amp="fp16")
    after_one, scaler = _train(model, cfg, _data(4, torch.float32), batch=4)
    assert steps_seen == [0]
    assert all(torch.equal(p, p0) for p, p0 in zip(after_one.parameters(), start.parameters()))  # skipped
    assert scaler.get_scale() == 2.0**16 * 0.5
    again, _ = _train(after_one, cfg, _data(4, torch.float32), batch=4)
    assert all(p.isfinite().all() for p in again.parameters())
    assert not torch.equal(again.weight, start.weight)  # a finite gradient applies
