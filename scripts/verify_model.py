"""Whole-model SyncBN check: one training step of N-rank SyncBN + DDP against one process on the global batch.

Called by ``scripts/verify_syncbn.py --config FILE`` inside an initialised process group. Every rank
builds the same model and the same global batch (from the config's seed); each trains on its own slice
through SyncBN + DDP, and also runs the reference (plain BatchNorm, the whole batch, one process) locally.
After one optimizer step every parameter and BatchNorm buffer must agree. Classification and segmentation
configs alike: each rank's loss (the task's, a mean over its samples or labelled pixels) is weighted by its share
of the global batch's, so the DDP average is exactly the loss of the whole batch even when ranks hold different
numbers of labelled pixels.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import build_datasets, model_inputs, with_dataset_classes
from engine.bn import convert_sync_batchnorm
from engine.config import load_config
from engine.optim import build_optimizer
from models import build_model
from tasks import IGNORE_INDEX, build_task


def _global_batch(cfg, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    train = build_datasets(cfg.data, cfg.model.num_classes, cfg.train.seed).train
    torch.manual_seed(cfg.train.seed)  # any augmentation draws the same on every rank
    samples = [train[i] for i in range(cfg.data.batch_size * world_size)]
    return torch.stack([s[0] for s in samples]), torch.stack([torch.as_tensor(s[1]) for s in samples])


def _counted(targets: torch.Tensor) -> torch.Tensor:
    """What the task's loss averages over: samples (classification) or labelled pixels (segmentation)."""
    return (targets != IGNORE_INDEX).sum() if targets.ndim > 1 else torch.tensor(len(targets))


def check_model(config_path: str, device: torch.device, atol: float) -> int:
    """Return 0 when N-rank SyncBN + DDP matches one process on the global batch after one step, else 1."""
    cfg = with_dataset_classes(load_config(config_path, ["data.num_workers=0"], defaults=model_inputs))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    images, targets = _global_batch(cfg, world_size)
    images, targets = images.to(device), targets.to(device)

    task = build_task(cfg)
    torch.manual_seed(cfg.train.seed)
    reference = build_model(cfg.model, cfg.task).to(device)
    synced = convert_sync_batchnorm(copy.deepcopy(reference), impl=cfg.syncbn.impl)
    ddp = DDP(synced, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)

    b = cfg.data.batch_size
    mine = slice(rank * b, (rank + 1) * b)
    share = _counted(targets[mine]) * world_size / _counted(targets)  # DDP averages: this makes it the global mean
    for model, x, y, weight in ((ddp, images[mine], targets[mine], share), (reference, images, targets, 1.0)):
        model.train()
        optimizer = build_optimizer(model, cfg.train, cfg.train.lr)
        (task.training_loss(model, x, y) * weight).backward()
        optimizer.step()

    reference_state, synced_state = reference.state_dict(), synced.state_dict()
    rows = [(name, (synced_state[name].double() - ref.double()).abs().max().item())
            for name, ref in reference_state.items() if ref.is_floating_point() and ref.numel()]
    worst = torch.tensor([max(err for _, err in rows)], device=device, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    ok = worst.item() <= atol
    if rank == 0:
        print(f"model {cfg.model.name} from {config_path}: {world_size} ranks x batch {b} with SyncBN + DDP "
              f"vs 1 process x batch {world_size * b}, one {cfg.train.optimizer} step, atol {atol:g}")
        width = max(len(name) for name, _ in rows)
        print(f"{'parameter / buffer':<{width}}  max |diff|")
        for name, err in rows:
            print(f"{name:<{width}}  {err:.3e}{'' if err <= atol else '  FAIL'}")
        print(f"worst over all ranks: {worst.item():.3e}  {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1
