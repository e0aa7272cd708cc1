"""Model EMA with BatchNorm done right: the same bits on every rank, in every checkpoint, after every resume.

``train.ema_decay: d`` keeps an exponential moving average of the weights, updated every ``train.ema_every``
optimizer steps with ``decay = min(d, (1 + u) / (10 + u))`` after u updates when ``train.ema_warmup`` (early
averages follow the weights instead of the random initialisation). Every rank applies the same ops to the same
(DDP-synchronised) weights, so the EMA is bit-identical everywhere without communication. BatchNorm buffers follow
``train.ema_buffers``: ``average`` them like the weights, ``copy`` the model's, or ``precise``: recompute them for
the averaged weights with PreciseBN before each evaluation (the statistics of the EMA weights' own activations,
which neither averaging nor copying gives; ``engine.bn.settle`` runs it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from engine.bn import batchnorm_layers
from engine.config import TrainConfig


class ModelEma:
    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.source, self.cfg, self.updates = model, cfg, 0
        # process groups are shared, not copied: the EMA's SyncBN layers synchronise over the same ranks
        groups = {id(m.process_group): m.process_group for m in model.modules()
                  if getattr(m, "process_group", None) is not None}  # fmt: skip
        self.module = copy.deepcopy(model, memo=dict(groups)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # the BatchNorm running statistics the registry knows: averaged under ema_buffers=average
        self._running = {f"{name}.{stat}".lstrip(".") for name, _ in batchnorm_layers(self.module)
                         for stat in ("running_mean", "running_var")}  # fmt: skip

    def decay(self) -> float:
        if not self.cfg.ema_warmup:
            return self.cfg.ema_decay
        return min(self.cfg.ema_decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, steps_done: int) -> None:
        """After the optimizer step that makes ``steps_done``: every ``train.ema_every`` steps."""
        if steps_done % self.cfg.ema_every:
            return
        d = self.decay()
        for ema, live in zip(self.module.parameters(), self.source.parameters(), strict=True):
            ema.lerp_(live.detach(), 1.0 - d)
        for (name, ema), live in zip(self.module.named_buffers(), self.source.buffers(), strict=True):
            if self.cfg.ema_buffers == "average" and name in self._running:
                ema.lerp_(live, 1.0 - d)
            else:  # copy (and precise, whose statistics are recomputed before each evaluation anyway)
                ema.copy_(live)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """``model``: a plain state_dict of the averaged weights (load it into the bare model to export them)."""
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
