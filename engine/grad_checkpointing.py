"""Activation checkpointing of a model's stages (``train.grad_checkpointing``): forward keeps only each block's input
and backward recomputes the block, trading about one more forward pass for the blocks' activation memory: how
segmentation and detection fit high resolutions, where SyncBN matters most.

Through the model's own switch where it has one (``set_grad_checkpointing``: timm models, timm feature extractors
such as smp's ``tu-`` encoders, the template's local models), else torchvision's ResNet layout (``layer1`` ..
``layerN`` of blocks, also inside torchvision's segmentation and detection backbones and smp's ResNet encoders),
whose stages become :class:`CheckpointedSequential` in place: the same children, so the same state_dict. Always
non-reentrant: it works under DDP without ``static_graph``, with unused parameters and with ``torch.autograd.grad``.
BatchNorm statistics stay exact through the recompute (``engine.bn.recompute``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_RESNET_STAGE = re.compile(r"layer\d+")


class CheckpointedSequential(nn.Sequential):
    """``nn.Sequential`` whose blocks each run under a (non-reentrant) checkpoint while training with gradients;
    exactly ``nn.Sequential`` otherwise (evaluation, ``no_grad`` passes such as PreciseBN's, export)."""

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(input)
        for block in self:
            input = checkpoint(block, input, use_reentrant=False)
        return input


def checkpoint_stages(*stages: nn.Module, enable: bool = True) -> None:
    """Make each ``nn.Sequential`` of blocks in ``stages`` a :class:`CheckpointedSequential` (or, ``enable=False``,
    a plain ``nn.Sequential`` again), in place: what a model's ``set_grad_checkpointing`` can call."""
    for stage in stages:
        if type(stage) not in (nn.Sequential, CheckpointedSequential):
            raise TypeError(f"checkpoint_stages: expected nn.Sequential stages, got {type(stage).__name__}")
        stage.__class__ = CheckpointedSequential if enable else nn.Sequential


def enable_grad_checkpointing(model: nn.Module) -> list[str]:
    """Checkpoint ``model``'s stages; returns what was checkpointed, by module path (empty: the model has no
    switch and no ResNet-style stages, or its switch refused)."""
    done: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        switch = getattr(module, "set_grad_checkpointing", None)
        if callable(switch):
            try:
                switch(True)
            except (AssertionError, NotImplementedError):  # timm: "gradient checkpointing not supported"
                return
            done.append(path or "the model")
            return
        for name, child in module.named_children():
            where = f"{path}.{name}" if path else name
            if _RESNET_STAGE.fullmatch(name) and type(child) in (nn.Sequential, CheckpointedSequential):
                checkpoint_stages(child)
                done.append(where)
            else:
                visit(child, where)

    visit(model, "")
    return done
