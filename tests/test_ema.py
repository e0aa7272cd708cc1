"""Model EMA (``engine.ema``): the same bits on every rank, each ``train.ema_buffers`` policy as it says, and exact
across checkpoints, SIGKILL and resume in the template."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.bn import convert_sync_batchnorm
from engine.config import Config, ModelConfig, TrainConfig
from engine.ema import ModelEma
from engine.model_setup import running_statistics
from engine.runtime.spawn import spawn
from models import build_model
from tests.helpers.jobs import killed_and_resumed, metric_records
from tests.helpers.syncbn import population_statistics


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def _train(model: nn.Module, ema: ModelEma, steps: int, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x, y = torch.randn(6, 3, 5, 5, generator=gen) * 2 + 1, torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update(step)


def _ema_on_ranks(rank: int, world: int) -> tuple[str, float, float]:
    """(hash of the EMA, its distance from the hand-computed interpolation, its distance from the start)."""
    raw = convert_sync_batchnorm(_net())
    start = [p.detach().clone().double() for p in raw.parameters()]
    model = DDP(raw, broadcast_buffers=False)
    ema = ModelEma(raw, TrainConfig(ema_decay=0.9, ema_buffers="average"))
    # by hand, in fp64, from the weights after each step: e <- e + (1 - d_u)(w - e), d_u = min(0.9, (1 + u)/(10 + u))
    want = [p.clone() for p in start]
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)  # every rank its own data: DDP keeps the weights equal
    for step in range(1, 6):
        x, y = torch.randn(6, 3, 5, 5, generator=gen) * 2 + 1, torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update(step)
        d = min(0.9, step / (9 + step))
        want = [e + (1 - d) * (p.detach().double() - e) for e, p in zip(want, raw.parameters())]
    got = [p.double() for p in ema.module.parameters()]
    off = max((g - w).abs().max().item() for g, w in zip(got, want))
    moved = max((g - s0).abs().max().item() for g, s0 in zip(got, start))
    digest = hashlib.sha256()
    for tensor in ema.module.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    hashes = [None] * world
    dist.all_gather_object(hashes, digest.hexdigest())
    return "|".join(hashes), off, moved


def test_ema_weights_are_bit_identical_on_every_rank() -> None:
    """Bit-identical everywhere without communication, and the average the formula says (not the start, not the
    live weights)."""
    results = spawn(_ema_on_ranks, 3)
    agreed = [hashes for hashes, _, _ in results]
    assert len(set(agreed[0].split("|"))) == 1 and all(a == agreed[0] for a in agreed)
    for _, off, moved in results:
        assert off < 1e-6 and moved > 1e-2, (off, moved)


@pytest.mark.parametrize("policy", ["average", "copy", "precise"])
def test_each_buffer_policy_does_what_it_says(policy: str) -> None:
    model = _net()
    cfg = TrainConfig(ema_decay=0.8, ema_every=2, ema_buffers=policy)
    ema = ModelEma(model, cfg)
    # by hand: every 2nd step, decay min(0.8, (1 + u) / (10 + u)) = 0.1, 0.1818..., lerp of weights (and buffers)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(3)
    updates = 0
    for step in range(1, 5):
        x, y = torch.randn(6, 3, 5, 5, generator=gen) * 2 + 1, torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update(step)
        if step % 2 == 0:
            d = min(0.8, (1 + updates) / (10 + updates))
            for key, value in model.state_dict().items():
                averaged = key.endswith(("weight", "bias")) or (policy == "average" and "running_" in key)
                want[key] = want[key] + (value - want[key]) * (1 - d) if averaged else value.clone()
            updates += 1
    got = ema.module.state_dict()
    for key in want:
        assert torch.allclose(got[key].double(), want[key].double(), atol=1e-6), (policy, key)
    assert ema.updates == 2
    if policy == "precise":  # recomputed for the averaged weights before evaluation, not averaged nor copied
        batches = [torch.randn(8, 3, 5, 5, generator=gen) * 2 + 1 for _ in range(2)]
        _settle_as_the_template_does(model, ema, cfg, batches)
        mean, var = population_statistics(ema.module, batches)["1"]
        assert torch.allclose(ema.module[1].running_mean, mean.float(), atol=1e-6)
        assert torch.allclose(ema.module[1].running_var, var.float(), atol=1e-6)
        assert not torch.allclose(ema.module[1].running_var, model[1].running_var, atol=1e-3)


def _settle_as_the_template_does(model: nn.Module, ema: ModelEma, train: TrainConfig, batches: list) -> None:
    """The template's statistics before an evaluation (engine.model_setup.running_statistics, one process)."""
    cfg = dataclasses.replace(Config(), train=train, syncbn=dataclasses.replace(Config().syncbn, precise_bn_samples=0))
    running_statistics(cfg, 1, model, ema, precise_batches=batches).before_evaluation(step=1)


@pytest.mark.slow
def test_the_template_with_ema_logs_saves_and_resumes_it_exactly(tmp_path) -> None:
    reference, resumed, _ = killed_and_resumed(tmp_path, train__ema_decay=0.9, train__ema_buffers="precise",
                                            train__best_metric="val_acc1_ema")
    records = metric_records(tmp_path / "reference")
    assert all({"val_loss_ema", "val_acc1_ema", "val_acc5_ema"} <= set(r) for r in records)
    best = torch.load(tmp_path / "reference" / "checkpoints" / "best.pt", weights_only=True)
    assert best["train_state"]["best_value"] == max(r["val_acc1_ema"] for r in records)  # best.pt by train.best_metric
    want, got = reference["ema"], resumed["ema"]
    assert want["updates"] == got["updates"] == 32
    assert [k for k in want["model"] if not torch.equal(want["model"][k], got["model"][k])] == []
    bare = build_model(ModelConfig(kwargs={"width": 4}))  # the EMA weights export as the bare model's state_dict
    bare.load_state_dict(got["model"])
