"""The BatchNorm layers: synchronised over ranks (:class:`SyncBatchNorm`), split into ghost batches
(:class:`GhostBatchNorm`), plain local BatchNorm of any input rank (:class:`AnyDimBatchNorm`), and their
"then dropout, then activation" forms, which keep timm's ``BatchNormAct2d`` what it is when converted.

All of them take ``BatchNorm{1,2,3}d``'s constructor and hold its parameters and buffers under the same names, so
state_dicts interchange with torch's layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from engine.bn import recompute
from engine.bn.functional import (
    SyncBatchNormFunction,
    active_group,
    check_at_least_2d,
    choose_collective,
    count_step,
    update_running_stats,
)


class AnyDimBatchNorm(_BatchNorm):
    """Plain local BatchNorm for (N, C, \\*) input of any rank; what revert gives when the original is unknown.
    A checkpoint's replay in backward normalises the same way without counting or updating the statistics again."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_at_least_2d(input)

    def forward(self, input: Tensor) -> Tensor:
        if self.training and recompute.recomputing():
            self._check_input_dim(input)
            running_mean, running_var = _replay_buffers(self)
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(input)


def _replay_buffers(bn: _BatchNorm) -> tuple[Tensor | None, Tensor | None]:
    """Copies of the running statistics for a replay's kernel to update and drop: the kernel saves the same
    tensors for backward as in the first forward (the checkpoint checks their number), the layer's stay as they are."""
    if not bn.track_running_stats or bn.running_mean is None:
        return None, None
    return bn.running_mean.clone(), bn.running_var.clone()


class SyncBatchNorm(AnyDimBatchNorm):
    r"""BatchNorm whose training statistics cover the whole batch of all ranks in ``process_group``, on any device.

    Same constructor, parameters and buffers as ``torch.nn.SyncBatchNorm`` (state_dicts interchange with it and
    with ``BatchNorm{1,2,3}d``); accepts (N, C, \*) input with any number of trailing dims.

    Training with a group of size > 1: mean and biased variance over all samples of all ranks, each rank weighted
    by its sample count (uneven and empty batches are exact); running stats get the global mean and unbiased
    variance, bit-identical on every rank. Cost: one collective forward (``collective``: ``"all_gather"`` of every
    rank's (count, mean, M2), or ``"all_reduce"`` of 2C+1 shifted sums whose size does not grow with the world;
    ``"auto"`` picks by bytes moved, see :func:`choose_collective`) and one all-reduce backward. Nothing is read
    on the host, so the CPU queues ahead and ``torch.compile(fullgraph=True)`` traces the layer whole.

    Edge cases, identical on every rank since they follow from the global count:
      * global count of 1 value per channel: outputs are the bias (variance 0, never NaN) and the running stats
        stay unchanged; the layer counts the event in ``single_value_batches`` and :func:`check_values_per_channel`
        (the trainer calls it at each agreement, where it reads the host anyway) raises BatchNorm's
        ``ValueError: Expected more than 1 value per channel when training ...`` on every rank;
      * global count of 0: empty outputs, running_mean/var unchanged (num_batches_tracked still counts the step,
        as BatchNorm does).

    The counter is a plain tensor attribute, not a buffer: DDP broadcasts every buffer before each forward
    (``broadcast_buffers=True``), and a buffer here would add that collective where ``torch.nn.SyncBatchNorm`` has
    none (with ``track_running_stats=False``, a model evaluated on one rank would then hang).

    Every rank must call the layer (and, in training, backward through it) the same number of times; an empty
    rank's loss must still depend on the output (e.g. a sum that is 0) so that its backward runs.

    Eval mode with running stats, no process group, a group of size 1, or a rank outside ``process_group``: no
    communication at all, exactly ``BatchNorm{1,2,3}d``'s result.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        collective: str = "auto",
    ) -> None:
        extra = {} if bias else {"bias": False}  # only pass what older torch versions may not know when needed
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        choose_collective(collective, 1)  # reject a bad name now, not at the first training step
        self.process_group, self.collective = process_group, collective
        # training forwards whose global batch had one value per channel (BatchNorm's error, raised later)
        self.single_value_batches = torch.zeros((), dtype=torch.int64, device=device)

    def _apply(self, fn: Any, recurse: bool = True) -> SyncBatchNorm:
        """Move the counter with the layer (``.to``, ``.cuda``, ``.to_empty``: it is no buffer, see the class
        docstring), starting it afresh: a move happens between trainings, not inside one."""
        self.single_value_batches = torch.zeros_like(fn(self.single_value_batches))
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, collective={self.collective}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        sync = active_group(self.process_group) if self.training else None
        if sync is None:
            return super().forward(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        group, world_size = sync
        replay = recompute.recomputing()
        kept = recompute.take(self) if replay else None
        factor = 0.0 if replay else count_step(self)
        tracking = self.track_running_stats and self.running_mean is not None
        out, mean, m2, count = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if tracking else None, self.eps, group, world_size,
            choose_collective(self.collective, world_size), kept,
        )
        if replay:
            return out
        recompute.keep(self, (count, mean, m2))
        if tracking:
            update_running_stats(self, mean, m2, count, factor)
        with torch.no_grad():
            self.single_value_batches.add_((count == 1).to(torch.int64))
        return out


class GhostBatchNorm(AnyDimBatchNorm):
    """BatchNorm that, in training, normalises ``virtual_splits`` equal chunks of the batch each on its own.

    It reproduces on one process what k processes of DDP with local BatchNorm compute (outputs and, with a mean
    loss over the whole batch, DDP's averaged gradients), so results can be compared or reproduced without the
    ranks. Running stats follow the FIRST chunk only, as DDP's broadcast_buffers makes them follow rank 0's.
    Eval: plain BatchNorm with the running stats. The batch must be divisible by ``virtual_splits``.
    """

    def __init__(self, *args: Any, virtual_splits: int, **kwargs: Any) -> None:
        """``BatchNorm{1,2,3}d``'s arguments, and the number of ghost batches."""
        if not isinstance(virtual_splits, int) or virtual_splits < 1:
            raise ValueError(f"GhostBatchNorm: virtual_splits must be a positive int, got {virtual_splits!r}")
        super().__init__(*args, **kwargs)
        self.virtual_splits = virtual_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_splits={self.virtual_splits}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        batch, splits = input.size(0), self.virtual_splits
        if not self.training or splits == 1 or batch == 0:
            return super().forward(input)
        if batch % splits:
            raise ValueError(
                f"GhostBatchNorm: batch size {batch} is not divisible by virtual_splits={splits}; "
                f"use a batch size that is a multiple of {splits} (e.g. drop_last=True in the loader)"
            )
        replay = recompute.recomputing()  # a checkpoint's replay: the same normalisation, no second update
        factor = 0.0 if replay else count_step(self)
        running_mean, running_var = _replay_buffers(self) if replay else (self.running_mean, self.running_var)
        tracked = self.track_running_stats
        outs = [
            F.batch_norm(chunk, running_mean if i == 0 and tracked else None,
                         running_var if i == 0 and tracked else None, self.weight, self.bias, True, factor, self.eps)
            for i, chunk in enumerate(input.split(batch // splits))
        ]  # fmt: skip
        return torch.cat(outs)


class _ThenDropAct(nn.Module):
    """Mixin: the BatchNorm's output goes through ``drop``, then ``act`` (the order of timm's ``BatchNormAct2d``,
    whose ``drop`` and ``act`` modules a conversion hands over unchanged, training flags included)."""

    def __init__(self, *args: Any, drop: nn.Module | None = None, act: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class BatchNormAct(_ThenDropAct, AnyDimBatchNorm):
    """Local BatchNorm, then ``drop``, then ``act``."""


class SyncBatchNormAct(_ThenDropAct, SyncBatchNorm):
    """:class:`SyncBatchNorm`, then ``drop``, then ``act``: timm's ``BatchNormAct2d`` synchronised."""


class TorchSyncBatchNormAct(_ThenDropAct, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` (its fused CUDA kernels), then ``drop``, then ``act``."""


def refuse_second_derivative(module: nn.Module, inputs: Any, output: Tensor) -> None:
    """Forward hook for torch's SyncBatchNorm (the converter adds it): its CUDA backward kernels are not
    differentiable, so a backward that builds a graph (``create_graph=True``: a gradient penalty) through a layer
    that synchronised stops with one line instead of a gradient nobody has checked. Ours is exact there."""
    if torch.compiler.is_compiling() or not (module.training and isinstance(output, Tensor) and output.requires_grad):
        return
    if active_group(module.process_group) is not None:
        output.register_hook(first_order_only)


def first_order_only(grad: Tensor) -> None:
    """A gradient hook: raise when this backward is itself to be differentiated (grad mode on inside backward)."""
    if torch.is_grad_enabled():
        raise RuntimeError("torch.nn.SyncBatchNorm's CUDA kernels have no second derivative (a gradient penalty through "
                           "them); convert with impl='ours' (syncbn.impl: ours), which is exact there")


class GhostBatchNormAct(_ThenDropAct, GhostBatchNorm):
    """:class:`GhostBatchNorm`, then ``drop``, then ``act``."""


def check_values_per_channel(module: nn.Module) -> None:
    """Raise BatchNorm's error if a SyncBatchNorm of ``module`` trained on a global batch of one value per channel.

    The layers only count such batches (reading the count in the layer would be a device-to-host sync per layer);
    the trainer calls this where it reads the host anyway. The count is global, so every rank raises together.
    """
    layers = [m for m in module.modules() if isinstance(m, SyncBatchNorm)]
    if not layers:
        return
    seen = torch.stack([m.single_value_batches for m in layers])
    if bool(seen.any()):
        for m in layers:
            m.single_value_batches.zero_()
        raise ValueError(
            "Expected more than 1 value per channel when training: a SyncBatchNorm layer got 1 value per channel "
            "in total over the ranks of its process group (use a larger batch, or drop the last incomplete batch)"
        )
