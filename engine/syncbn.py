"""BatchNorm over the global batch on every device and backend, ghost BatchNorm, converters, buffer consistency.

``torch.nn.SyncBatchNorm`` only synchronises CUDA (and a few accelerator) tensors and raises on CPU once a
process group exists, so CPU/gloo runs, tests and small clusters cannot use it. :class:`SyncBatchNorm` here keeps
the same promise everywhere: in training, the statistics are those of the concatenation of every rank's batch,
with the cost of exactly one collective in forward and one in backward per layer. In eval mode, or without a
process group of size > 1, it is ``torch.nn.BatchNorm{1,2,3}d``, bit for bit, with no communication.

This module imports only torch, so it can be copied into another project as is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "AnyDimBatchNorm",
    "GhostBatchNorm",
    "SyncBatchNorm",
    "check_values_per_channel",
    "choose_collective",
    "convert_ghost_batchnorm",
    "convert_sync_batchnorm",
    "recompute_bn_stats",
    "revert_sync_batchnorm",
    "sync_bn_buffers",
]

_VALID_IMPLS = ("auto", "torch", "ours")
_VALID_COLLECTIVES = ("auto", "all_gather", "all_reduce")
_VALID_POLICIES = ("broadcast", "reduce")


# --------------------------------------------------------------------------------------------- small helpers


def _check_at_least_2d(input: Tensor) -> None:
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _active_group(process_group: Any) -> tuple[Any, int] | None:
    """(group, size) when statistics must be synchronised; None without a group, size 1, or not a member."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    size = dist.get_world_size(group)  # -1 on a rank that is not a member of ``group``
    return (group, size) if size > 1 else None


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 accumulate in fp32 (their range and precision are too small for sums); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _count_step(bn: _BatchNorm) -> float | Tensor:
    """Advance ``num_batches_tracked`` as ``_BatchNorm.forward`` does and return the running-stats factor: the
    momentum, or for ``momentum=None`` the cumulative-average factor 1/count, kept a tensor (no host read)."""
    if not bn.track_running_stats or bn.num_batches_tracked is None:
        return 0.0 if bn.momentum is None else bn.momentum
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return bn.num_batches_tracked.to(torch.float64).reciprocal()
    return bn.momentum


def _all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """Sum over the group. Traced by torch.compile: a functional collective (dynamo keeps it in the graph); eager:
    the plain in-place call, which skips the functional form's async wrapper (about 1 ms a layer on CPU)."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(t, "sum", group)
    dist.all_reduce(t, group=group)
    return t


_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer name first


def _all_gather_rows(t: Tensor, group: Any, world_size: int) -> Tensor:
    """Every rank's 1-D ``t`` as the rows of a (world_size, len) tensor, in one collective (as above)."""
    if torch.compiler.is_compiling():
        return funcol.all_gather_single(t, 0, group).view(world_size, -1)
    out = t.new_empty(world_size, t.numel())
    _gather_into_tensor(out.view(-1), t, group=group)
    return out


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


# --------------------------------------------------------------------------------------------- the math


def choose_collective(collective: str, world_size: int) -> str:
    """``"auto"``: the forward collective that moves fewer bytes per rank at this world size.

    Per statistic, the all-gather receives W-1 fp32 values on each rank; a ring all-reduce of one fp64 value sends
    and receives 2(W-1)/W of it, i.e. 16(W-1)/W bytes against 4(W-1): equal at W=4, so from W=4 up ``all_reduce``.
    Above a few ranks the all-gather's message grows with W and the all-reduce's stays O(C) (and can use
    in-network reduction).
    """
    if collective not in _VALID_COLLECTIVES:
        raise ValueError(f"SyncBatchNorm: collective must be one of {', '.join(_VALID_COLLECTIVES)}; got {collective!r}")
    if collective != "auto":
        return collective
    return "all_reduce" if world_size >= 4 else "all_gather"


def _reduce_dtype(device: torch.device) -> torch.dtype:
    """fp64 for the all-reduce's sums wherever the device has it (MPS has not: fp32 there, with the shared shift)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _local_moments(x: Tensor, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's (count, mean, M2) per channel; an empty rank has count 0 and zeros, which the combine ignores.

    Mean and sum of squared deviations (not sum and sum of squares) keep a large common offset from cancelling.
    """
    channels = x.size(1)
    count = x.numel() // channels
    if count == 0:
        zeros = x.new_zeros(channels, dtype=stat_dtype)
        return zeros.new_zeros(()), zeros, zeros
    # the fused single-pass (Welford) kernel BatchNorm itself uses: ~3x faster than var_mean on CPU, as stable
    mean, var = torch.batch_norm_update_stats(x.to(stat_dtype), None, None, 0.0)
    return mean.new_full((), float(count)), mean, var * count


def _gathered_moments(x: Tensor, stat_dtype: torch.dtype, group: Any, world_size: int) -> tuple[Tensor, ...]:
    """All-gather every rank's (count, mean, M2), combined by Chan's parallel formula: (W-1)(2C+1) values received.

    Every rank runs the same ops on the same gathered tensor, so the result (and hence the running buffers) is
    identical everywhere and DDP's buffer broadcast is unnecessary.
    """
    count, mean, m2 = _local_moments(x, stat_dtype)
    channels = mean.numel()
    rows = _all_gather_rows(torch.cat([count.view(1), mean, m2]), group, world_size)
    counts, means, m2s = rows[:, :1], rows[:, 1 : 1 + channels], rows[:, 1 + channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total.clamp(min=1)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


def _reduced_moments(x: Tensor, stat_dtype: torch.dtype, shift: Tensor | None, group: Any) -> tuple[Tensor, ...]:
    """One all-reduce (SUM) of 2C+1 values, whatever the world size: ``[n, n(mean-K), M2 + n(mean-K)^2]`` in fp64.

    Summed over ranks these are N, N(mean_g - K) and M2_g + N(mean_g - K)^2, so the global mean and M2 follow
    exactly. ``K`` must be the same on every rank: the running mean (identical on every rank under SyncBN, and
    close to the batch mean once training has begun, which keeps the subtraction small even in fp32), or 0 without
    running statistics (fp64 holds a 1e4 offset on unit variance to ~1e-8 relative).
    """
    count, mean, m2 = _local_moments(x, stat_dtype)
    rd = _reduce_dtype(x.device)
    k = shift.detach().to(rd) if shift is not None else mean.new_zeros(mean.shape, dtype=rd)
    n, d = count.to(rd), mean.to(rd) - k
    sums = _all_reduce_sum(torch.cat([n.view(1), n * d, m2.to(rd) + n * d * d]), group)
    channels = mean.numel()
    total, s1, s2 = sums[0], sums[1 : 1 + channels], sums[1 + channels :]
    shifted_mean = s1 / total.clamp(min=1)
    m2 = (s2 - s1 * shifted_mean).clamp(min=0)
    return total.to(stat_dtype), (k + shifted_mean).to(stat_dtype), m2.to(stat_dtype)


def _update_running_stats(bn: _BatchNorm, mean: Tensor, m2: Tensor, count: Tensor, factor: float | Tensor) -> None:
    """Running mean and unbiased variance, with no host read: a global count of 0 or 1 leaves them unchanged."""
    with torch.no_grad():
        rm, rv = bn.running_mean, bn.running_var
        f = torch.where(count > 1, torch.as_tensor(factor, dtype=rm.dtype, device=rm.device), 0.0).to(rm.dtype)
        rm.mul_(1 - f).add_(mean.to(rm.dtype) * f)
        rv.mul_(1 - f).add_((m2 / (count - 1).clamp(min=1)).to(rv.dtype) * f)


def _affine_of_x(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias per channel, through BatchNorm's own fused inference kernel.

    One pass over ``x`` in its dtype and layout (channels_last stays channels_last), accumulating in the statistics
    dtype; its precision is that of local BatchNorm on the same device, because it is the same kernel.
    """
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Global-batch BatchNorm: one collective forward (all-gather or all-reduce of 2C+1 moments), one all-reduce of
    2C sums backward; returns (output, global mean, global M2, global count), the last three non-differentiable.

    Every full-size pass runs one of BatchNorm's fused kernels, so apart from its two collectives the layer costs
    what local BatchNorm costs: statistics (one pass) and normalisation (one pass) forward; the local sums (one
    pass) and dx (two passes) backward. Parameters and statistics are handed to the kernels in the statistics
    dtype, which is also how BatchNorm runs a bf16/fp16 input with fp32 parameters. The collectives are functional
    collectives and nothing is read on the host, so dynamo traces the layer whole (``fullgraph=True``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor | None,
        eps: float,
        group: Any,
        world_size: int,
        collective: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd = _stat_dtype(x.dtype)
        if collective == "all_reduce":
            count, mean, m2 = _reduced_moments(x, sd, shift, group)
        else:
            count, mean, m2 = _gathered_moments(x, sd, group, world_size)
        var = m2 / count.clamp(min=1)  # biased; a global count of 1 gives 0, never NaN
        weight_sd = None if weight is None else weight.to(sd)
        ctx.save_for_backward(x, weight_sd, mean, var, count)
        ctx.group, ctx.eps = group, eps
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, m2, count)
        out = _affine_of_x(x, mean, var, weight_sd, None if bias is None else bias.to(sd), eps)
        return out, mean, m2, count

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:
        # Autograd calls this on an empty rank too (its output is part of the loss graph, with an empty grad), so
        # every rank enters the all-reduce. Whether the input needs a grad is decided by the graph, not the data,
        # so all ranks skip it together when it does not (then only the local parameter grads are needed).
        x, weight, mean, var, count = ctx.saved_tensors
        if x.numel() > 0:
            # with the global statistics as "running" stats, the inference backward's parameter grads are exactly
            # this rank's sum(dy * xhat) and sum(dy), in one fused pass (also without a weight)
            # (empty save_mean/save_invstd mean "use the running stats"; CUDA asserts they are defined)
            empty = mean.new_empty(0)
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, mean, var, empty, empty, False, ctx.eps, [False, True, True]
            )
        else:
            sum_dy_xhat, sum_dy = torch.zeros_like(mean), torch.zeros_like(mean)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_weight = sum_dy_xhat.to(ctx.weight_dtype) if need_w and ctx.weight_dtype is not None else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        grad_x = None
        if need_x:
            sums = _all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            mean_dy, mean_dy_xhat = (sums / count.clamp(min=1)).chunk(2)
            scale = torch.rsqrt(var + ctx.eps)
            scale = scale if weight is None else scale * weight
            # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)): an affine map of x, plus dy * scale
            grad_x = _affine_of_x(x, mean, var, -scale * mean_dy_xhat, -scale * mean_dy, ctx.eps)
            grad_x = grad_x.addcmul_(grad_out, _per_channel(scale, x.dim()))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


# --------------------------------------------------------------------------------------------- modules


class SyncBatchNorm(_BatchNorm):
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
        self.register_buffer("single_value_batches", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, collective={self.collective}"

    def _check_input_dim(self, input: Tensor) -> None:
        _check_at_least_2d(input)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        sync = _active_group(self.process_group) if self.training else None
        if sync is None:
            return super().forward(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        group, world_size = sync
        factor = _count_step(self)
        tracking = self.track_running_stats and self.running_mean is not None
        out, mean, m2, count = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if tracking else None, self.eps, group, world_size,
            choose_collective(self.collective, world_size),
        )
        if tracking:
            _update_running_stats(self, mean, m2, count, factor)
        with torch.no_grad():
            self.single_value_batches.add_((count == 1).to(torch.int64))
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None) -> nn.Module:
        """Drop-in for ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, producing this class."""
        return convert_sync_batchnorm(module, process_group, impl="ours")


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


class AnyDimBatchNorm(_BatchNorm):
    """Plain local BatchNorm for (N, C, *) input of any rank; what revert gives when the original class is unknown."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_at_least_2d(input)


class GhostBatchNorm(_BatchNorm):
    """BatchNorm that, in training, normalises ``virtual_splits`` equal chunks of the batch each on its own.

    It reproduces on one process what k processes of DDP with local BatchNorm compute (outputs and, with a mean
    loss over the whole batch, DDP's averaged gradients), so results can be compared or reproduced without the
    ranks. Running stats follow the FIRST chunk only, as DDP's broadcast_buffers makes them follow rank 0's.
    Eval: plain BatchNorm with the running stats. The batch must be divisible by ``virtual_splits``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        virtual_splits: int,
        bias: bool = True,
    ) -> None:
        if not isinstance(virtual_splits, int) or virtual_splits < 1:
            raise ValueError(f"GhostBatchNorm: virtual_splits must be a positive int, got {virtual_splits!r}")
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self.virtual_splits = virtual_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_splits={self.virtual_splits}"

    def _check_input_dim(self, input: Tensor) -> None:
        _check_at_least_2d(input)

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
        factor = _count_step(self)
        outs = [
            F.batch_norm(
                chunk,
                self.running_mean if i == 0 and self.track_running_stats else None,
                self.running_var if i == 0 and self.track_running_stats else None,
                self.weight,
                self.bias,
                True,
                factor,
                self.eps,
            )
            for i, chunk in enumerate(input.split(batch // splits))
        ]
        return torch.cat(outs)


# --------------------------------------------------------------------------------------------- converters


def _replace_batchnorms(module: nn.Module, build: Callable[[_BatchNorm], nn.Module | None]) -> nn.Module:
    """Rebuild every _BatchNorm for which ``build`` returns a module (None: keep it); also the root."""
    out = build(module) if isinstance(module, _BatchNorm) else None
    out = module if out is None else out
    for name, child in module.named_children():
        new_child = _replace_batchnorms(child, build)
        if new_child is not child or out is not module:
            out.add_module(name, new_child)
    return out


def _hand_over(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    """Give ``dst`` the very tensors of ``src``, so optimizers, DDP and requires_grad keep pointing at them."""
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _bias_kwargs(bn: _BatchNorm) -> dict[str, bool]:
    return {"bias": False} if bn.affine and bn.bias is None else {}


def _is_on_cuda(bn: _BatchNorm) -> bool:
    return _device_of(bn).type == "cuda"


def _device_of(bn: _BatchNorm) -> torch.device:
    tensor = next(itertools.chain(bn.parameters(recurse=False), bn.buffers(recurse=False)), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _reject_data_parallel(module: nn.Module) -> None:
    if any(isinstance(m, nn.DataParallel) for m in module.modules()):
        raise ValueError(
            "convert_sync_batchnorm: the model is wrapped in torch.nn.DataParallel, whose replicas are threads of "
            "one process with no process group to synchronise over. Use DistributedDataParallel (one process per "
            "device) and convert the model before or after wrapping it."
        )


def convert_sync_batchnorm(
    module: nn.Module, process_group: Any | None = None, impl: str = "auto", collective: str = "auto"
) -> nn.Module:
    """Replace every BatchNorm (root included, also inside DDP) by a synchronised one, keeping its tensors.

    ``impl``: "auto" uses torch.nn.SyncBatchNorm for layers on CUDA (its fused kernels) and ours elsewhere,
    "torch" always torch's, "ours" always ours. ``collective`` (ours only): the forward collective, see
    :class:`SyncBatchNorm`. Layers already synchronised are left as they are. The original class is remembered in
    ``_orig_bn_class`` so :func:`revert_sync_batchnorm` can restore it.
    """
    if impl not in _VALID_IMPLS:
        raise ValueError(f"convert_sync_batchnorm: impl must be one of {', '.join(_VALID_IMPLS)}; got {impl!r}")
    choose_collective(collective, 1)
    _reject_data_parallel(module)

    def build(bn: _BatchNorm) -> nn.Module | None:
        if isinstance(bn, (SyncBatchNorm, nn.SyncBatchNorm)):
            return None
        use_torch = impl == "torch" or (impl == "auto" and _is_on_cuda(bn))
        args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
        if use_torch:
            new = nn.SyncBatchNorm(*args, device="meta", **_bias_kwargs(bn))  # every tensor is replaced right away
        else:
            new = SyncBatchNorm(*args, device="meta", collective=collective, **_bias_kwargs(bn))
            new.single_value_batches = torch.zeros((), dtype=torch.int64, device=_device_of(bn))
        new._orig_bn_class = getattr(bn, "_orig_bn_class", type(bn))
        return _hand_over(bn, new)

    return _replace_batchnorms(module, build)


def _plain_batchnorm(bn: _BatchNorm) -> _BatchNorm:
    """An instance of the remembered original class when it can be built like BatchNorm, else AnyDimBatchNorm."""
    args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    cls = getattr(bn, "_orig_bn_class", None)
    if isinstance(cls, type) and issubclass(cls, _BatchNorm):
        try:
            return cls(*args, device="meta", **_bias_kwargs(bn))
        except TypeError:  # a custom subclass with its own constructor: fall through to the generic one
            pass
    return AnyDimBatchNorm(*args, device="meta", **_bias_kwargs(bn))


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn SyncBatchNorm (ours or torch's) and GhostBatchNorm back into local BatchNorm for inference/export.

    The original ``BatchNorm{1,2,3}d`` class is restored when known (``_orig_bn_class``), else
    :class:`AnyDimBatchNorm`. The same Parameter and buffer objects are kept.
    """

    def build(bn: _BatchNorm) -> nn.Module | None:
        if not isinstance(bn, (SyncBatchNorm, nn.SyncBatchNorm, GhostBatchNorm)):
            return None
        return _hand_over(bn, _plain_batchnorm(bn))

    return _replace_batchnorms(module, build)


def convert_ghost_batchnorm(module: nn.Module, virtual_splits: int) -> nn.Module:
    """Replace every BatchNorm (root included) by :class:`GhostBatchNorm`, keeping its tensors; ghosts stay as is."""

    def build(bn: _BatchNorm) -> nn.Module | None:
        if isinstance(bn, GhostBatchNorm):
            return None
        new = GhostBatchNorm(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device="meta",
            virtual_splits=virtual_splits,
            **_bias_kwargs(bn),
        )
        new._orig_bn_class = getattr(bn, "_orig_bn_class", type(bn))
        return _hand_over(bn, new)

    return _replace_batchnorms(module, build)


# --------------------------------------------------------------------------------------------- buffers


def _tracked_batchnorms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


def _pack_buffers(layers: list[_BatchNorm]) -> Tensor:
    """All running stats as one fp64 vector: [means..., vars..., num_batches_tracked...] (fp64 holds them exactly)."""
    parts = [m.running_mean for m in layers] + [m.running_var for m in layers]
    parts += [m.num_batches_tracked.view(1) for m in layers if m.num_batches_tracked is not None]
    return torch.cat([p.reshape(-1).to(torch.float64) for p in parts])


def _unpack_buffers(layers: list[_BatchNorm], flat: Tensor) -> None:
    targets = [m.running_mean for m in layers] + [m.running_var for m in layers]
    targets += [m.num_batches_tracked for m in layers if m.num_batches_tracked is not None]
    offset = 0
    for t in targets:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def sync_bn_buffers(module: nn.Module, policy: str = "broadcast", process_group: Any | None = None) -> None:
    """Make the running stats of every BatchNorm equal on all ranks, for models trained without SyncBN.

    "broadcast": take (group) rank 0's, as DDP's broadcast_buffers does. "reduce": pool the ranks with equal
    weights: mean of the running means, and mean of the running vars plus the spread of the per-rank means
    (mean of (mean_r - pooled_mean)^2). num_batches_tracked is rank 0's. All layers travel in one collective.
    No-op without a process group, with a group of size 1, or on a rank outside ``process_group``.
    """
    if policy not in _VALID_POLICIES:
        raise ValueError(f"sync_bn_buffers: policy must be one of {', '.join(_VALID_POLICIES)}; got {policy!r}")
    sync = _active_group(process_group)
    layers = _tracked_batchnorms(module)
    if sync is None or not layers:
        return
    group, world_size = sync
    flat = _pack_buffers(layers)
    if policy == "broadcast":
        src = 0 if process_group is None else dist.get_global_rank(group, 0)
        dist.broadcast(flat, src=src, group=group)
    else:
        flat = _pool_buffers(_all_gather_rows(flat, group, world_size), layers)
    with torch.no_grad():
        _unpack_buffers(layers, flat)


def _pool_buffers(rows: Tensor, layers: list[_BatchNorm]) -> Tensor:
    """Equal-weight pooling of gathered [means, vars, counters] rows; two-pass, so large means do not cancel."""
    channels = sum(m.running_mean.numel() for m in layers)
    means, variances = rows[:, :channels], rows[:, channels : 2 * channels]
    pooled_mean = means.mean(0)
    pooled_var = variances.mean(0) + ((means - pooled_mean) ** 2).mean(0)
    return torch.cat([pooled_mean, pooled_var, rows[0, 2 * channels :]])


# --------------------------------------------------------------------------------------------- PreciseBN


def _batch_moments(x: Tensor) -> tuple[float, Tensor, Tensor]:
    """(count, mean, M2) per channel of one layer input: the layer's own fused Welford pass (:func:`_local_moments`),
    the count taken from the shape (no device-to-host sync inside the forward), the moments kept in fp64."""
    count = float(x.numel() // x.size(1))
    _, mean, m2 = _local_moments(x.detach(), _stat_dtype(x.dtype))
    return count, mean.double(), m2.double()


def _merge(a: tuple[float, Tensor, Tensor], b: tuple[float, Tensor, Tensor]) -> tuple[float, Tensor, Tensor]:
    """Chan et al.'s pairwise merge of two (count, mean, M2) summaries; counts are host numbers."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return a
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Any], num_samples: int) -> int:
    """PreciseBN: set every BatchNorm's running stats to the population statistics of the values it sees.

    With the weights frozen (no grad, no optimizer), runs training-mode forward passes over ``batches`` (input
    tensors, or tuples whose first item is the input; every rank passes its own shard) until ``num_samples``
    samples have been seen over all ranks, and sets each BatchNorm's ``running_mean`` to the mean and
    ``running_var`` to the unbiased variance of every value that layer saw (every position of every sample),
    merged with Chan's formula in fp64, identical on every rank. Returns the global number of samples used.

    Every rank runs the same number of forward passes (SyncBN's collectives must match): a rank whose shard is
    exhausted feeds empty batches while others still have data. With SyncBN each pass normalises with the global
    batch's statistics, so the result does not depend on the world size. Without SyncBN (or with ghost BatchNorm)
    each rank's pass normalises with its own (or its split's) statistics, as training did: the population
    statistics are then those of the activations training produced, pooled over all ranks.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if not layers:
        return 0
    summaries: dict[_BatchNorm, tuple[Tensor, Tensor, Tensor]] = {}

    def record(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        seen = _batch_moments(inputs[0])
        summaries[layer] = _merge(summaries[layer], seen) if layer in summaries else seen

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    was_training = model.training
    device = layers[0].running_mean.device
    synchronised = any(isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) for m in layers)
    sync = _active_group(None)
    model.train()
    total, template, iterator = 0, None, iter(batches)
    try:
        while total < num_samples:
            batch = next(iterator, None)
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            template = x if x is not None else template
            mine = 0 if x is None else len(x)
            # one small all-reduce per pass: the global sample count, and whether some rank has no batch at all
            agreed = torch.tensor([mine, template is None], dtype=torch.float64, device=device)
            if sync is not None:
                dist.all_reduce(agreed, group=sync[0])
            samples, shapeless = (int(v) for v in agreed.tolist())
            if samples == 0:
                break  # every shard is exhausted
            if shapeless:
                raise ValueError("recompute_bn_stats: every rank needs at least one batch (an input shape)")
            total += samples
            if x is None and synchronised:  # keep SyncBN's collectives matched with an empty batch
                x = template[:0]
            if x is not None:
                model(x.to(device, non_blocking=True))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    _set_population_stats(layers, summaries, sync)
    return total


def _set_population_stats(layers: list[_BatchNorm], summaries: dict, sync: tuple[Any, int] | None) -> None:
    """Merge every rank's summaries (one all-gather for all layers, folded in rank order) and set the buffers."""
    parts = []
    for layer in layers:
        zeros = torch.zeros_like(layer.running_mean, dtype=torch.float64)
        count, mean, m2 = summaries.get(layer, (0.0, zeros, zeros))
        parts += [mean.new_tensor([count]), mean, m2]
    flat = torch.cat(parts)
    rows = _all_gather_rows(flat, sync[0], sync[1]) if sync is not None else flat[None]
    offset = 0
    for layer in layers:
        channels = layer.num_features
        merged = None
        for row, count in zip(rows, rows[:, offset].tolist()):
            summary = (count, row[offset + 1 : offset + 1 + channels], row[offset + 1 + channels : offset + 1 + 2 * channels])
            merged = summary if merged is None else _merge(merged, summary)
        offset += 1 + 2 * channels
        count, mean, m2 = merged
        if count > 1:
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_((m2 / (count - 1)).to(layer.running_var.dtype))
